"""Weight scales per output channel and group of input columns (``QuantConfig.group_size``): the grids, weight-only
layers, the block-wise ONNX export that ONNX Runtime runs as ``MatMulNBits``, the compressed file, GPTQ on them,
and what is refused."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from test_oneshot_core import correlated_inputs
from torch import nn

from lightning_compress.deploy import compressed_bytes, load_compressed, onnx_bytes
from lightning_compress.deploy.integer_layers import IntegerLayer
from lightning_compress.oneshot.quantization import OneShotQuantizationConfig, one_shot_quantize
from lightning_compress.pruning.structured import ChannelGroups
from lightning_compress.quantization import QuantConfig, quantize_model, set_quantization

GROUPED = QuantConfig(weight_bits=4, observer="minmax", group_size=16)


def grouped_mlp(config: QuantConfig = GROUPED) -> nn.Sequential:
    """Two linear layers (64 -> 32 -> 8) with grouped 4-bit weights, observed and enabled, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    quantize_model(model, config)
    model.train()(torch.randn(4, 64))  # the weight quantizers observe their weights
    set_quantization(model, enabled=True)
    return model.eval()


def test_each_row_and_group_of_columns_has_its_own_min_max_grid() -> None:
    layer = grouped_mlp()[0]
    weight = layer.weight.detach()
    groups = weight.reshape(32, 4, 16)
    expected_scale = groups.abs().amax(-1) / 7
    torch.testing.assert_close(layer.weight_quantizer.scale.reshape(32, 4), expected_scale, rtol=0, atol=0)
    rounded = (groups / expected_scale.unsqueeze(-1)).round().clamp(-7, 7) * expected_scale.unsqueeze(-1)
    torch.testing.assert_close(layer.weight_quantizer(weight), rounded.reshape(32, 64), rtol=0, atol=1e-7)
    assert (groups / expected_scale.unsqueeze(-1)).round().abs().amax(-1).eq(7).all()  # each group's extreme on +-7


def test_grouped_layers_quantize_their_weights_alone() -> None:
    model = grouped_mlp()
    layer = model[0]
    assert layer.input_quantizer is None
    x = torch.randn(5, 64)
    expected = F.linear(x, layer.weight_quantizer(layer.weight), layer.bias)  # the input and bias in float
    assert torch.equal(layer(x), expected)


def asymmetric_grouped_mlp() -> nn.Sequential:
    return grouped_mlp(QuantConfig(weight_bits=4, observer="minmax", group_size=16, symmetric=False))


@pytest.mark.parametrize("make_model", [grouped_mlp, asymmetric_grouped_mlp], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("shape", [(3, 64), (3, 5, 64)], ids=["gemm", "matmul"])
def test_the_export_writes_four_bit_blocks_that_onnx_runtime_runs_as_matmul_nbits(make_model, shape, tmp_path) -> None:
    model = make_model()
    inputs = torch.randn(*shape)
    graph = onnx.load_from_string(onnx_bytes(model, inputs[:1]))
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    dequantizers = [node for node in graph.graph.node if node.op_type == "DequantizeLinear"]
    assert len(dequantizers) == 2 and "Gemm" not in {node.op_type for node in graph.graph.node}
    for node, index in zip(dequantizers, (0, 2)):
        layer = model[index]
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        assert attributes == {"axis": 0, "block_size": 16}
        stored, scale = initializers[node.input[0]], initializers[node.input[1]]
        integer = IntegerLayer.of(layer)
        assert stored.data_type == (TensorProto.INT4 if integer.weight_range[0] < 0 else TensorProto.UINT4)
        assert tuple(stored.dims) == (layer.in_features, layer.out_features)  # as MatMul reads it
        assert np.array_equal(numpy_helper.to_array(stored).astype(np.int64), integer.weight.T)
        assert np.array_equal(numpy_helper.to_array(scale), integer.weight_scale.T)  # (groups, out)
        assert (len(node.input) == 3) == bool(np.any(integer.weight_zero_point != 0))
    optimized = tmp_path / "optimized.onnx"
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    default = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert [node.op_type for node in onnx.load(optimized).graph.node].count("MatMulNBits") == 2
    exact = onnxruntime.SessionOptions()  # MatMulNBits on float inputs, not on its own int8 rounding of them
    exact.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    exact = onnxruntime.InferenceSession(graph.SerializeToString(), exact, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(inputs)
    feed = {default.get_inputs()[0].name: inputs.numpy()}
    torch.testing.assert_close(torch.from_numpy(exact.run(None, feed)[0]), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(default.run(None, feed)[0]), expected, atol=2e-2, rtol=2e-2)


def test_the_compressed_file_and_a_state_dict_give_back_the_grouped_weights(tmp_path) -> None:
    model = grouped_mlp()
    path = tmp_path / "model.lcz"
    path.write_bytes(compressed_bytes(model))
    fresh = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    quantize_model(fresh, GROUPED)
    load_compressed(fresh, path).eval()
    again = copy.deepcopy(fresh)
    again.load_state_dict(model.state_dict())
    x = torch.randn(6, 64)
    for loaded in (fresh, again):
        for index in (0, 2):
            assert torch.equal(loaded[index].weight_quantizer.scale, model[index].weight_quantizer.scale)
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_grids_per_group_changes_the_outputs_less_than_round_to_nearest(act_order) -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    inputs = correlated_inputs(features=32)
    config = QuantConfig(weight_bits=4, observer="minmax", group_size=8)
    errors = {}
    for method in ("gptq", "rtn"):
        model = copy.deepcopy(dense)
        one_shot_quantize(
            model,
            inputs.split(128),
            OneShotQuantizationConfig(method=method, quantization=config, act_order=act_order),
            progress=False,
        )
        layer = model[0]
        assert layer.input_quantizer is None and layer.weight_quantizer.scale.shape == (64 * 4,)
        if method == "gptq":  # rounded in place onto the grids the quantizer keeps
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
        with torch.no_grad():
            errors[method] = float((model.eval()(inputs) - dense(inputs)).square().mean())
    assert errors["gptq"] < 0.7 * errors["rtn"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"group_size": 0}, "group_size must be None or an integer >= 1, got 0"),
        ({"group_size": 1.5}, "group_size must be None or an integer >= 1, got 1.5"),
        ({"group_size": True}, "group_size must be None or an integer >= 1, got True"),
        ({"group_size": 64, "per_channel": False}, "group_size=64 needs per_channel=True"),
    ],
)
def test_bad_group_sizes_fail_when_made(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        QuantConfig(**settings)


def test_layers_that_groups_do_not_fit_are_refused_before_any_is_quantized() -> None:
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 8))
    with pytest.raises(ValueError, match=r"group_size=64 must divide the 96 input features of 2 \(Linear\)"):
        quantize_model(model, QuantConfig(group_size=64))
    assert type(model[0]) is nn.Linear  # nothing converted
    convolutional = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="groups the input columns of linear layers; 0 is a Conv2d"):
        quantize_model(convolutional, QuantConfig(group_size=8))


def test_channel_removal_refuses_weights_with_scales_per_group() -> None:
    model = grouped_mlp()
    groups = ChannelGroups(model, torch.randn(1, 64), {"0": model[0]})
    keep = torch.ones(32, dtype=torch.bool)
    keep[:4] = False
    with pytest.raises(ValueError, match="a weight scale per group of 16 input columns"):
        groups.remove({"0": keep})


def test_learned_scales_per_group_train_one_step_size_each() -> None:
    model = grouped_mlp(QuantConfig(weight_bits=4, observer="minmax", group_size=16, learnable_scales=True))
    layer = model[0]
    model.train()
    model(torch.randn(8, 64)).square().sum().backward()
    gradient = layer.weight_quantizer.scale.grad
    assert gradient.shape == (32 * 4,) and bool((gradient != 0).all())
