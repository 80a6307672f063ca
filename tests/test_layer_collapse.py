"""Global pruning never empties a layer or an output unit (layer collapse, Tanaka et al. 2020), and every method
that ranks, clusters or calibrates weights refuses NaN or infinite ones, naming them."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from digits import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import efficientnet_b0, mobilenet_v2
from torchvision.models.vision_transformer import VisionTransformer

from lightning_compress import Pruning, WeightClustering
from lightning_compress.models import ClassificationModule
from lightning_compress.models.vit import vision_transformer
from lightning_compress.oneshot import OneShotPruningConfig, OneShotQuantizationConfig
from lightning_compress.oneshot.pruning import one_shot_prune
from lightning_compress.oneshot.quantization import one_shot_quantize
from lightning_compress.pruning import Pruner, PruningConfig, prune_, rank_masks
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model

#: Fit with ``Pruning`` (2 epochs of 2 batches: the callback prunes at the start of epoch 0, before any step).
FITTED: dict[str, Callable[[], nn.Module]] = {
    "torchvision_vit": lambda: VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ),
    "vision_transformer": lambda: vision_transformer(
        num_classes=10, image_size=32, patch_size=8, in_channels=3, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ),
}
#: Pruned by ``prune_`` as ``Pruning`` prunes them at the start of epoch 0: fitting them takes 10 s to a minute each
#: on two CPU cores, and what is ranked is the same freshly initialised weights.
PRUNED: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v2": lambda: mobilenet_v2(num_classes=10),
    "efficientnet_b0": lambda: efficientnet_b0(num_classes=10),
}
CASES = [(model, amount) for model in [*FITTED, *PRUNED] for amount in (0.5, 0.9)]
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, float], tuple[nn.Module, Pruner]]:
    """``(model, amount)`` -> the model pruned to ``amount`` with the defaults of ``Pruning``, and its Pruner."""
    done: dict[tuple[str, float], tuple[nn.Module, Pruner]] = {}

    def prune(model: str, amount: float) -> tuple[nn.Module, Pruner]:
        if (model, amount) not in done:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # few batches; the ViT's zero-initialised head
                if model in PRUNED:
                    network = PRUNED[model]()
                    done[(model, amount)] = network, prune_(network, amount)
                else:
                    module, pruning = ClassificationModule(FITTED[model](), num_classes=10), Pruning(amount=amount)
                    data = DataLoader(TensorDataset(IMAGES, torch.tensor([0, 1, 2, 3])), batch_size=2)
                    root = tmp_path_factory.mktemp("fit")
                    quiet_trainer(root, [pruning], enable_checkpointing=False).fit(module, data)
                    done[(model, amount)] = module, pruning.pruner
        return done[(model, amount)]

    return prune


@pytest.mark.parametrize("model, amount", CASES)
def test_global_pruning_keeps_every_layer_and_output_unit_at_the_exact_amount(pruned, model, amount) -> None:
    network, pruner = pruned(model, amount)
    weights = pruner.parameters
    empty_rows = {name: int(((weight != 0).flatten(1).sum(1) == 0).sum()) for name, weight in weights.items()}
    assert {name: rows for name, rows in empty_rows.items() if rows} == {}  # so no layer is 100% zero either
    total = sum(weight.numel() for weight in weights.values())
    assert sum(int((~mask).sum()) for mask in pruner.masks.values()) == round(amount * total)
    assert sum(int((weight == 0).sum()) for weight in weights.values()) == round(amount * total)
    network.train()  # batch statistics: in eval mode these barely trained nets shrink the signal to ~1e-10, dense too
    with torch.no_grad():
        logits = network(IMAGES)
    assert float(logits.std(dim=0).max()) > 1e-3


def test_a_layer_scaled_down_keeps_its_share_of_a_global_ranking() -> None:
    def pruned_by_layer(scale: float) -> dict[str, float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        with torch.no_grad():
            model[2].weight.mul_(scale)
        return prune_(model, 0.7).sparsity()

    reference = pruned_by_layer(1.0)
    assert pruned_by_layer(1e-3) == reference  # the same masks, not layer 2 emptied first
    assert reference["pruning/sparsity/2.weight"] < 0.9


def test_every_row_keeps_its_best_weight_and_the_count_stays_exact() -> None:
    scores = {"big": torch.arange(1.0, 13.0).view(3, 4), "tiny": torch.tensor([[1e-6, 2e-6], [3e-6, 4e-6]])}
    masks = rank_masks(scores, 0.5)  # 8 of 16, but never the best of a row
    assert masks["tiny"].tolist() == [[False, True], [False, True]]
    assert masks["big"].tolist() == [[False, False, False, True], [False, False, False, True], [True] * 4]


def test_an_amount_that_would_empty_an_output_unit_is_refused_before_pruning() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"10 of the 40 entries ranked together stay .* at most 0.7500"):
        Pruner(model, PruningConfig(amount=0.8))
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0.weight' at 0.95 \(4 rows of 9\) can be pruned to at most 0.8889"):
        Pruner(depthwise, PruningConfig(amount={"0": 0.95}))
    assert (model[0].weight != 0).all()


def test_a_layer_of_zero_scores_is_named_in_a_warning_and_keeps_one_weight_per_row() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    nn.init.zeros_(model[2].weight)
    warned: list[str] = []
    pruner = Pruner(model, PruningConfig(amount=0.5), warn=warned.append)
    pruner.prune()
    assert len(warned) == 1 and "['2.weight'] is zero" in warned[0] and "arbitrary" in warned[0]
    assert pruner.masks["2.weight"].sum(dim=1).tolist() == [1, 1, 1, 1]


def test_the_threshold_rule_keeps_the_largest_weight_of_every_row() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.01, 0.2, 0.0], [0.02, -0.03, 0.01, 0.0]]))
    prune_(model, None, threshold=0.1)
    assert (model[0].weight != 0).tolist() == [[True, False, True, False], [False, True, False, False]]


def broken_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    return model


NAMED = r"'2\.weight' is NaN or infinite"


def test_pruning_refuses_a_nan_weight_naming_it(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"Pruning ranks the weights it prunes.*" + NAMED):
        prune_(broken_model(), 0.5)
    module = ClassificationModule(broken_model(), num_classes=4)
    data = DataLoader(TensorDataset(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])), batch_size=2)
    with pytest.raises(ValueError, match="model.2.weight"):
        quiet_trainer(tmp_path, [Pruning(amount=0.5)], max_epochs=1).fit(module, data)


def test_weight_clustering_refuses_a_nan_weight_naming_it(tmp_path) -> None:
    module = ClassificationModule(broken_model(), num_classes=4)
    data = DataLoader(TensorDataset(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])), batch_size=2)
    with pytest.raises(ValueError, match=r"WeightClustering clusters the weights.*'model\.2\.weight' is NaN"):
        quiet_trainer(tmp_path, [WeightClustering(clusters=4)], max_epochs=1).fit(module, data)


def test_calibration_refuses_a_nan_weight_naming_it() -> None:
    model = broken_model()
    quantize_model(model, QuantConfig(observer="minmax"))
    with pytest.raises(ValueError, match=r"Post-training calibration.*" + NAMED):
        calibrate(model, [torch.randn(4, 8)])


def test_one_shot_methods_refuse_a_nan_weight_naming_it() -> None:
    batches = [torch.randn(16, 8)]
    with pytest.raises(ValueError, match=r"One-shot pruning \(wanda\).*" + NAMED):
        one_shot_prune(broken_model(), batches, OneShotPruningConfig(method="wanda"), progress=False)
    with pytest.raises(ValueError, match=r"One-shot quantization \(gptq\).*" + NAMED):
        one_shot_quantize(broken_model(), batches, OneShotQuantizationConfig(), progress=False)
