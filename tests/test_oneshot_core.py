"""One-shot compression from calibration data (Wanda, SparseGPT and magnitude pruning, GPTQ rounding): known
answers on tiny layers, the sequential order, real tokens only, and bad settings refused before any work."""

from __future__ import annotations

import copy

import pytest
import torch
from text_models import TINY_BERT_LINEAR_LAYERS, sample_datamodule, tiny_bert
from torch import nn

from lightning_compress.oneshot.gptq import WeightGrid, gptq_quantize
from lightning_compress.oneshot.hessian import InputGram, inverse_hessian_factor
from lightning_compress.oneshot.layer_inputs import compress_layer_by_layer, layer_groups
from lightning_compress.oneshot.pruning import OneShotPruningConfig, one_shot_prune
from lightning_compress.oneshot.reconstruction import reconstruct_surviving_weights


def correlated_inputs(rows: int = 512, features: int = 32, seed: int = 0) -> torch.Tensor:
    """Inputs whose features mix a few shared factors: far from the identity Hessian magnitude pruning assumes."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(rows, 4, generator=generator)
    return factors @ torch.randn(4, features, generator=generator) + 0.1 * torch.randn(
        rows, features, generator=generator
    )


def output_error(dense: nn.Linear, pruned: nn.Linear, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float((dense(inputs) - pruned(inputs)).square().sum())


def pruned_copy(layer: nn.Linear, inputs: torch.Tensor, **settings) -> nn.Linear:
    model = nn.Sequential(copy.deepcopy(layer))
    one_shot_prune(model, inputs.split(128), OneShotPruningConfig(**settings), progress=False)
    return model[0]


@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_sparsegpt_changes_the_outputs_less_than_magnitude_pruning_on_correlated_inputs(granularity):
    torch.manual_seed(0)
    dense, inputs = nn.Linear(32, 16), correlated_inputs()
    errors = {
        method: output_error(dense, pruned_copy(dense, inputs, method=method, granularity=granularity), inputs)
        for method in ("magnitude", "wanda", "sparsegpt")
    }
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


def test_wanda_keeps_the_small_weights_of_a_feature_a_hundred_times_larger():
    torch.manual_seed(0)
    dense = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.rand(4, 8) + 1.0)  # |w| in [1, 2) everywhere ...
        dense.weight[:, 3] = 0.05  # ... but the weights of feature 3, which magnitude pruning drops first
    inputs = torch.randn(256, 8)
    inputs[:, 3] *= 100.0
    magnitude = pruned_copy(dense, inputs, method="magnitude", amount=0.5)
    wanda = pruned_copy(dense, inputs, method="wanda", amount=0.5)
    assert (magnitude.weight[:, 3] == 0).all()
    assert (wanda.weight[:, 3] == dense.weight[:, 3]).all()
    assert output_error(dense, wanda, inputs) < output_error(dense, magnitude, inputs)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("granularity", "kept", "group"), [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_n_of_m_patterns_hold_exactly(method, granularity, kept, group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    pruner = one_shot_prune(
        model,
        correlated_inputs(features=16).split(64),
        OneShotPruningConfig(method=method, granularity=granularity),
        progress=False,
    )
    for layer in (model[0], model[2]):
        nonzero = (layer.weight != 0).view(layer.out_features, -1, group).sum(-1)
        assert (nonzero == kept).all()
    assert pruner.sparsity()["pruning/sparsity"] == 1 - kept / group


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_sparsity_is_exact_per_layer_and_masks_match_the_zeros(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 10))
    pruner = one_shot_prune(
        model, [torch.randn(64, 16) for _ in range(2)], OneShotPruningConfig(method=method, amount=0.3), progress=False
    )
    assert int((model[0].weight == 0).sum()) == round(0.3 * 16 * 40) == 192
    assert int((model[2].weight == 0).sum()) == round(0.3 * 40 * 10) == 120
    for name in ("0.weight", "2.weight"):
        assert torch.equal(pruner.masks[name], model.get_parameter(name) != 0)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_reconstruction_solves_each_rows_surviving_weights_exactly(damping):
    torch.manual_seed(0)
    weight, inputs = torch.randn(12, 32), correlated_inputs()
    inputs[:, 5] *= 30.0  # an outlier feature, as transformers have: a badly conditioned Gram matrix
    keep = torch.rand(12, 32) > 0.5
    gram = inputs.T @ inputs / len(inputs)
    solved = reconstruct_surviving_weights(weight, keep, gram, damping)
    ridge = gram.double() + damping * gram.diagonal().mean().double() * torch.eye(32, dtype=torch.float64)
    exact = torch.zeros(12, 32, dtype=torch.float64)
    for row in range(12):
        kept = keep[row].nonzero().squeeze(1)
        exact[row, kept] = torch.linalg.solve(ridge[kept][:, kept], (weight[row].double() @ ridge)[kept])

    def objective(solution: torch.Tensor) -> torch.Tensor:  # each row's output change plus the ridge
        change = weight.double() - solution.double()
        return ((change @ ridge) * change).sum(1)

    assert torch.allclose(objective(solved), objective(exact), rtol=1e-6)
    assert torch.allclose(solved.double(), exact, atol=1e-3)
    assert (solved[~keep] == 0).all()


def test_reconstruction_towards_a_reference_solves_each_row_for_the_reference_outputs():
    torch.manual_seed(0)
    weight, reference_inputs = torch.randn(8, 32), correlated_inputs()
    inputs = reference_inputs + 0.3 * torch.randn_like(reference_inputs)  # what pruned layers before it compute
    keep = torch.rand(8, 32) > 0.5
    gram, cross = inputs.T @ inputs / len(inputs), reference_inputs.T @ inputs / len(inputs)
    solved = reconstruct_surviving_weights(weight, keep, gram, 0.1, cross)
    ridge = 0.1 * gram.diagonal().mean().double()
    for row in range(8):
        kept = keep[row].nonzero().squeeze(1)
        left = gram.double()[kept][:, kept] + ridge * torch.eye(len(kept), dtype=torch.float64)
        right = (weight[row].double() @ cross.double() + ridge * weight[row].double())[kept]
        assert torch.allclose(solved[row, kept].double(), torch.linalg.solve(left, right), atol=1e-4)
    towards_own = reconstruct_surviving_weights(weight, keep, gram, 0.1)
    target = reference_inputs @ weight.T
    assert (inputs @ solved.T - target).square().sum() < (inputs @ towards_own.T - target).square().sum()


def test_a_pruned_layer_is_solved_for_the_dense_models_outputs_through_the_layers_pruned_before_it():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    inputs = correlated_inputs()
    errors = {}
    for reconstruct in (False, True):
        model = copy.deepcopy(dense)
        config = OneShotPruningConfig(reconstruct=reconstruct, reconstruction_damping=1e-3)
        one_shot_prune(model, inputs.split(128), config, progress=False)
        assert all(int((model[i].weight == 0).sum()) == model[i].weight.numel() // 2 for i in (0, 2))
        with torch.no_grad():
            errors[reconstruct] = float((model(inputs) - dense(inputs)).square().sum())
    assert errors[True] < 0.8 * errors[False], errors


def test_reconstruction_on_a_singular_gram_matrix_without_damping_asks_for_damping():
    inputs = torch.randn(64, 4).repeat(1, 2)  # every feature twice: a singular Gram matrix
    with pytest.raises(ValueError, match="singular with damping=0: give a damping > 0"):
        reconstruct_surviving_weights(torch.randn(3, 8), torch.rand(3, 8) > 0.5, inputs.T @ inputs / 64, damping=0.0)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_reconstruction_keeps_the_mask_and_lowers_the_output_error_of_every_method(method, granularity):
    torch.manual_seed(0)
    dense, inputs = nn.Linear(32, 16), correlated_inputs()
    plain = pruned_copy(dense, inputs, method=method, granularity=granularity)
    solved = pruned_copy(
        dense, inputs, method=method, granularity=granularity, reconstruct=True, reconstruction_damping=1e-4
    )
    assert torch.equal(plain.weight == 0, solved.weight == 0)
    assert output_error(dense, solved, inputs) < 0.9 * output_error(dense, plain, inputs)


def test_amounts_per_layer_prune_each_named_layer_to_its_own_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    amounts = {"0": 0.25, "2": 0.75}
    pruner = one_shot_prune(model, [torch.randn(64, 16)], OneShotPruningConfig(amount=amounts), progress=False)
    assert int((model[0].weight == 0).sum()) == 128 and int((model[2].weight == 0).sum()) == 192
    assert sorted(pruner.masks) == ["0.weight", "2.weight"]


def test_reconstruction_with_magnitude_pruning_needs_calibration_batches():
    config = OneShotPruningConfig(method="magnitude", reconstruct=True)
    with pytest.raises(ValueError, match="reconstruct=True learns from calibration batches: give some"):
        one_shot_prune(nn.Sequential(nn.Linear(4, 4)), None, config, progress=False)


def test_sparsegpt_on_calibration_inputs_is_deterministic_and_keeps_zeros_while_training():
    def pruned():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        return model, one_shot_prune(
            model,
            [torch.ones(8, 16), torch.arange(16.0).repeat(8, 1)] * 4,
            OneShotPruningConfig(damping=0.1),
            progress=False,
        )

    (first, pruner), (second, _) = pruned(), pruned()
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    optimizer = torch.optim.SGD(first.parameters(), lr=0.5)
    pruner.attach(optimizer)
    first(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    assert pruner.sparsity()["pruning/sparsity"] == 0.5


def test_each_layer_is_calibrated_on_the_outputs_of_the_layers_pruned_before_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    inputs = torch.randn(64, 8)
    grams = {}

    def prune_first_and_record(group, gram):
        grams[next(iter(group))] = gram.matrix.clone()
        if "0" in group:
            with torch.no_grad():
                model[0].weight[:, :4] = 0

    compress_layer_by_layer(model, {"0": model[0], "2": model[2]}, [inputs], prune_first_and_record, progress=False)
    hidden = model[1](model[0](inputs)).detach()  # model[0] as pruned
    assert torch.allclose(grams["2"], hidden.T @ hidden / 64, atol=1e-6)


def test_query_key_and_value_share_one_gram_matrix_and_padding_tokens_never_count():
    model = tiny_bert(max_length=16).eval()
    datamodule = sample_datamodule(max_length=16)
    datamodule.setup()
    ids = datamodule.splits["train"].tensors[0][:8]
    layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    groups = layer_groups(model, layers, ids)
    first_attention = [group.names for group in groups][0]
    assert first_attention == tuple(
        f"encoder.encoder.layer.0.attention.self.{name}" for name in ("query", "key", "value")
    )
    assert sum(len(group.names) for group in groups) == TINY_BERT_LINEAR_LAYERS
    rows = []
    compress_layer_by_layer(model, layers, [ids], lambda group, gram: rows.append(gram.rows), progress=False)
    real_tokens = int((ids != 0).sum())
    assert rows[:-1] == [real_tokens] * (len(groups) - 1)  # the head reads one mean-pooled row per gloss
    assert rows[-1] == len(ids)


def test_sparsegpt_prunes_a_tiny_bert_to_half_of_every_linear_weight():
    model = tiny_bert(max_length=16).eval()
    datamodule = sample_datamodule(max_length=16, batch_size=8)
    datamodule.setup()
    reference = model(datamodule.splits["test"].tensors[0][:8])
    pruner = one_shot_prune(
        model, datamodule.train_dataloader(), OneShotPruningConfig(), calibration_batches=4, progress=False
    )
    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert len(pruner.masks) == len(linear) == TINY_BERT_LINEAR_LAYERS
    assert all(int((layer.weight == 0).sum()) == layer.weight.numel() // 2 for layer in linear)
    assert model(datamodule.splits["test"].tensors[0][:8]).shape == reference.shape


def test_an_input_gram_is_the_mean_outer_product_however_the_rows_are_batched():
    rows = torch.randn(100, 6)
    whole, parts = InputGram(6), InputGram(6)
    whole.add(rows)
    for part in rows.split(7):
        parts.add(part)
    assert torch.allclose(whole.matrix, rows.T @ rows / 100, atol=1e-6)
    assert torch.allclose(parts.matrix, whole.matrix, atol=1e-6) and parts.rows == 100


def test_an_input_gram_keeps_the_cross_products_with_a_reference_models_rows():
    rows, reference = torch.randn(100, 6), torch.randn(100, 6)
    gram = InputGram(6, cross=True)
    for part, reference_part in zip(rows.split(7), reference.split(7), strict=True):
        gram.add(part, reference_part)
    assert torch.allclose(gram.cross, reference.T @ rows / 100, atol=1e-6)
    assert torch.allclose(gram.matrix, rows.T @ rows / 100, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"amount": 1.0}, r"amount must be in \[0, 1\)"),
        ({"amount": -0.1}, r"amount must be in \[0, 1\)"),
        ({"granularity": "3:2"}, "unknown granularity '3:2'"),
        ({"granularity": "channel"}, "one-shot methods rank single weights"),
        ({"granularity": "2:4", "amount": 0.3}, "means sparsity 0.5; amount=0.3 contradicts it"),
        ({"method": "obs"}, "method must be one of wanda, sparsegpt, magnitude"),
        ({"damping": -1}, "damping must be a number >= 0"),
        ({"reconstruction_damping": "high"}, "reconstruction_damping must be a number > 0"),
        ({"reconstruction_damping": 0.0}, "reconstruction_damping must be a number > 0"),
        ({"reconstruct": 1}, "reconstruct must be True or False"),
        ({"amount": "half"}, "a number in \\[0, 1\\) \\(the sparsity\\), or a dict of layer name -> sparsity"),
        ({"amount": {"fc": 1.5}}, r"each amount in \[0, 1\)"),
    ],
)
def test_bad_settings_fail_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        OneShotPruningConfig(**settings)


def test_a_model_without_linear_layers_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="Sequential has no nn.Linear layer"):
        one_shot_prune(model, [torch.randn(2, 1, 8, 8)], OneShotPruningConfig(), progress=False)


def test_a_hessian_still_singular_after_damping_names_the_layer_and_asks_for_more_damping():
    model = nn.Sequential(nn.Linear(4, 4))
    inputs = torch.zeros(16, 4)
    inputs[:, 0] = 1.0
    inputs[:, 1] = 1.0  # features 0 and 1 always equal: a singular Hessian
    with pytest.raises(ValueError, match=r"singular after damping=0: give a larger damping \(e.g. 0.01\)") as error:
        one_shot_prune(model, [inputs], OneShotPruningConfig(damping=0.0), progress=False)
    assert "'0'" in str(error.value)
    assert torch.isfinite(inverse_hessian_factor(inputs.T @ inputs / 16, 0.01, "0")).all()


def test_no_calibration_batch_is_refused():
    with pytest.raises(ValueError, match="got no calibration batches"):
        one_shot_prune(nn.Sequential(nn.Linear(4, 4)), [], OneShotPruningConfig(method="wanda"), progress=False)


def reconstruction_error(dense: torch.Tensor, rounded: torch.Tensor, inputs: torch.Tensor) -> float:
    return float((inputs @ (dense - rounded).T).square().sum())


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("quant_range", "symmetric"), [((-7, 7), True), ((0, 15), False)])
def test_gptq_reconstructs_the_outputs_better_than_round_to_nearest_on_the_same_grid(
    group_size, act_order, quant_range, symmetric
):
    torch.manual_seed(0)
    weight, inputs = torch.randn(16, 32), correlated_inputs()
    grid = WeightGrid.of(weight, quant_range, symmetric, group_size)
    rounded = gptq_quantize(weight, inputs.T @ inputs / len(inputs), grid, 0.01, "fc", act_order=act_order)
    nearest = grid.round(weight)
    assert torch.equal(grid.round(rounded), rounded)  # every value on its grid
    assert reconstruction_error(weight, rounded, inputs) < 0.5 * reconstruction_error(weight, nearest, inputs)


def test_a_group_size_that_does_not_divide_the_inputs_is_refused():
    with pytest.raises(ValueError, match="group_size=5 must divide the 32 input columns"):
        WeightGrid.of(torch.randn(4, 32), (-7, 7), True, group_size=5)


def test_targets_naming_a_convolution_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(ValueError, match=r"prunes nn.Linear layers; the targets also name \{'0': 'Conv2d'\}"):
        one_shot_prune(model, [torch.randn(2, 1, 8, 8)], OneShotPruningConfig(targets=["0", "2"]), progress=False)
