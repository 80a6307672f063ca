"""Mixed-precision post-training quantization within a byte budget: the knapsack optimum of the measured grids, the
bytes predicted as the ONNX export writes them, per-layer grids that reach the quantizers, and bad input refused."""

from __future__ import annotations

import itertools

import onnx
import onnxruntime
import pytest
import torch
from test_oneshot_core import correlated_inputs
from text_models import tiny_bert
from torch import nn

from lightning_compress.auto import BitPlan, allocate_bits, weight_onnx_bytes
from lightning_compress.auto.post_training import grid_config
from lightning_compress.deploy import onnx_bytes
from lightning_compress.oneshot import OneShotQuantizationConfig, one_shot_quantize
from lightning_compress.quantization import QuantConfig

GRIDS = [(8, None), (4, 8), (4, None)]
TABLE = "encoder.embeddings.word_embeddings"
#: A tiny BERT's linear layers and word embeddings (its position and token type tables, folded by the export, left out)
BERT_TARGETS = {"targets": [nn.Linear, nn.Embedding], "exclude": ["*position_embeddings", "*token_type_embeddings"]}


class IgnoredBranch(nn.Module):
    """Two layers in a row, and a third whose output is multiplied by zero: rounding it changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.ignored = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x))) + 0 * self.ignored(x)


def batches() -> list[torch.Tensor]:
    return list(correlated_inputs(rows=256, features=32).split(64))


def cheapest_bytes(model: nn.Module, names: list[str]) -> int:
    layers = dict(model.named_modules())
    return sum(
        min(weight_onnx_bytes(layers[name], grid_config(layers[name], grid)) for grid in GRIDS) for name in names
    )


def best_within(plan: BitPlan, max_bytes: int) -> float:
    """The least summed damage of any choice of one measured candidate a layer within ``max_bytes``, by trying all."""
    return min(
        sum(candidate.damage for candidate in choice)
        for choice in itertools.product(*plan.measured.values())
        if sum(candidate.cost for candidate in choice) <= max_bytes
    )


def chosen_grids(plan: BitPlan) -> dict[str, tuple[int, int]]:
    return {name: (c.setting.weight_bits, c.setting.group_size) for name, c in plan.chosen.items()}


def test_a_layer_whose_rounding_changes_nothing_gets_the_cheapest_grid_and_the_plan_is_the_optimum() -> None:
    model = IgnoredBranch()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    floor = cheapest_bytes(model, ["first", "second", "ignored"])
    upgrade = weight_onnx_bytes(model.first, grid_config(model.first, (8, None))) - weight_onnx_bytes(
        model.first, grid_config(model.first, (4, None))
    )
    plan = allocate_bits(model, batches(), floor + upgrade, GRIDS, progress=False)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())  # measured only
    assert [c.damage for c in plan.measured["ignored"]] == [0.0, 0.0, 0.0]
    assert chosen_grids(plan)["ignored"] == (4, 32)  # the cheapest: 4 bits, one scale a row
    assert plan.predicted_bytes <= floor + upgrade
    assert plan.predicted_damage == pytest.approx(best_within(plan, floor + upgrade), rel=1e-9)
    first = plan.measured["first"]
    assert first[0].damage < min(first[1].damage, first[2].damage)  # 8 bits, then 4 bits in groups of 8 or a row

    rich = allocate_bits(model, batches(), 10**9, GRIDS, progress=False)
    assert chosen_grids(rich) == {"first": (8, 32), "second": (8, 32), "ignored": (4, 32)}
    floor_plan = allocate_bits(model, batches(), floor, GRIDS, progress=False)
    assert set(chosen_grids(floor_plan).values()) == {(4, 32)} and floor_plan.predicted_bytes == floor


def test_the_plan_applied_by_one_shot_gptq_puts_each_layer_on_its_grids_and_the_export_writes_the_predicted_bytes() -> (
    None
):
    model = tiny_bert().eval()
    ids = torch.randint(5, 200, (64, 16), generator=torch.Generator().manual_seed(0))
    inputs = list(ids.split(16))
    floor = cheapest_bytes(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + [TABLE])
    plan = allocate_bits(model, inputs, floor + 2_000, GRIDS, **BERT_TARGETS, progress=False)
    assert TABLE in plan.chosen and len(plan.chosen) == 14  # 13 linear layers and the word embeddings
    assert len({chosen for chosen in chosen_grids(plan).values()}) > 1  # mixed precision

    layers = one_shot_quantize(model, inputs, plan.config, progress=False)
    assert sorted(layers) == sorted(plan.chosen)
    for name, layer in layers.items():
        grids = plan.chosen[name].setting
        assert layer.quant_config == grids and layer.weight_quantizer.quant_range == grids.weight_range
        assert layer.weight_quantizer.group_size == grids.group_size
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # on its grids, kept

    float_model = tiny_bert().eval()
    graph = onnx_bytes(model, ids[:1])
    written = initializer_bytes(graph) - initializer_bytes(onnx_bytes(float_model, ids[:1]))
    modules = dict(float_model.named_modules())
    float_bytes = sum(weight_onnx_bytes(modules[name]) for name in plan.chosen)
    assert written == plan.predicted_bytes - float_bytes
    exact = onnxruntime.SessionOptions()  # MatMulNBits on float inputs, not on its own int8 rounding of them
    exact.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = onnxruntime.InferenceSession(graph, exact, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(ids)
    computed = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(computed), expected, atol=1e-5, rtol=1e-5)


def initializer_bytes(graph: bytes) -> int:
    """The bytes of every initializer's values in an ONNX graph (4-bit integers two a byte, as stored)."""
    return sum(len(tensor.raw_data) for tensor in onnx.load_from_string(graph).graph.initializer)


def test_a_budget_below_the_cheapest_plan_is_refused_before_any_measurement() -> None:
    model = IgnoredBranch()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    floor = cheapest_bytes(model, ["first", "second", "ignored"])
    with pytest.raises(ValueError, match=rf"max_bytes={floor - 1} is below {floor:,}, the bytes of the cheapest plan"):
        allocate_bits(model, batches(), floor - 1, GRIDS, progress=False)
    assert calls == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grids": [(9, None)]}, r"grids must be a non-empty sequence of \(weight bits from 2 to 8"),
        ({"grids": []}, "grids must be a non-empty sequence"),
        ({"grids": [(4, 48)]}, r"none of grids=\[\(4, 48\)\] fits first"),
        ({"max_bytes": -1}, "max_bytes must be a number of bytes >= 0; got -1"),
        ({"method": "awq"}, "method must be one of gptq, rtn; got 'awq'"),
        ({"targets": [nn.ReLU]}, "matches no layer|leave no layer"),
    ],
)
def test_bad_arguments_are_refused_before_any_measurement(settings, message) -> None:
    model = IgnoredBranch()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    arguments = {"max_bytes": 10**6, "grids": GRIDS} | settings
    with pytest.raises(ValueError, match=message):
        allocate_bits(model, batches(), progress=False, **arguments)
    assert calls == []


def test_a_quantized_model_is_refused() -> None:
    model = IgnoredBranch()
    one_shot_quantize(model, batches(), OneShotQuantizationConfig(), progress=False)
    with pytest.raises(ValueError, match=r"measures a float model; \['first', 'second', 'ignored'\] are quantized"):
        allocate_bits(model, batches(), 10**6, GRIDS, progress=False)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_per_layer_grids_reach_the_quantizers_and_tables_are_rounded_to_nearest(method) -> None:
    model = tiny_bert().eval()
    table = dict(model.named_modules())[TABLE].weight.detach().clone()
    own = {
        TABLE: QuantConfig(weight_bits=4, observer="minmax"),
        "encoder.encoder.layer.0.attention.self.query": QuantConfig(weight_bits=8, group_size=16, observer="minmax"),
        "head": QuantConfig(weight_bits=4, group_size=8, observer="minmax"),
    }
    ids = torch.randint(5, 200, (32, 16), generator=torch.Generator().manual_seed(0))
    layers = one_shot_quantize(
        model, ids.split(16), OneShotQuantizationConfig(method, layer_quantization=own), progress=False
    )
    assert sorted(layers) == sorted(own)  # the named layers alone are the targets
    for name, layer in layers.items():
        assert layer.quant_config == own[name] and layer.weight_quantizer.group_size == own[name].group_size
        assert bool(layer.weight_quantizer.enabled) and not bool(layer.weight_quantizer.observing)
        if method == "gptq":  # the rounded weights, kept; round-to-nearest leaves them to the quantizers
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
    quantizer = layers[TABLE].weight_quantizer
    with torch.no_grad():
        rounded = quantizer(layers[TABLE].weight)
    scale = quantizer.scale.unsqueeze(1)
    assert torch.allclose(scale, table.abs().amax(1, keepdim=True) / 7, atol=1e-6)  # a grid a row, min-max
    assert ((rounded - table).abs() <= scale / 2 + 1e-6).all()  # to nearest


def test_per_layer_grids_are_checked_when_made_and_their_names_against_the_model() -> None:
    with pytest.raises(ValueError, match=r"layer_quantization\['fc'\] must be a QuantConfig"):
        OneShotQuantizationConfig(layer_quantization={"fc": 4})
    with pytest.raises(ValueError, match="layer_quantization must be None or a non-empty dict"):
        OneShotQuantizationConfig(layer_quantization={})
    model = IgnoredBranch()
    config = OneShotQuantizationConfig(layer_quantization={"frist": QuantConfig(weight_bits=8, group_size=32)})
    with pytest.raises(ValueError, match=r"names \['frist'\], which are not targeted .* near names: \['first'"):
        one_shot_quantize(model, batches(), config, progress=False)
    excluded = OneShotQuantizationConfig(
        targets=[nn.Linear], exclude=["ignored"], layer_quantization={"ignored": QuantConfig()}
    )
    with pytest.raises(ValueError, match=r"names \['ignored'\], which are not targeted"):
        one_shot_quantize(model, batches(), excluded, progress=False)
    assert not hasattr(model.first, "weight_quantizer")  # refused before any layer changed
