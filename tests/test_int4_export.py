"""4-bit weights in the ONNX artifact: INT4 / UINT4 initializers, half the bytes of int8, the fake-quantized numbers."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from lightning_compress import export
from lightning_compress.deploy import onnx_bytes
from lightning_compress.deploy.qdq import FOUR_BIT_OPSET
from lightning_compress.models import SmallCNN
from lightning_compress.quantization import QuantConfig, quantize_model, quantized_layers, set_quantization

W4 = {"symmetric": (TensorProto.INT4, (-7, 7)), "asymmetric": (TensorProto.UINT4, (0, 15))}


def conv_batchnorm_linear() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )
    with torch.no_grad():  # negative BatchNorm scales: the folded integers are mirrored inside the 4-bit range
        model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.9, -2.0, 1.1, -1.0, 0.6, 1.3]))
    return model


def trained_like_qat(model: nn.Module, config: QuantConfig, inputs: torch.Tensor) -> nn.Module:
    """As QuantizationAwareTraining leaves a model: observed in training, then trained fake-quantized, then eval."""
    quantize_model(model, config)
    model.train()
    with torch.no_grad():
        for step, batch in enumerate(inputs.split(len(inputs) // 4)):
            set_quantization(model, enabled=step >= 2)
            model(batch)
    return model.eval()


def without_batchnorm_shift(model: nn.Sequential) -> nn.Sequential:
    """``model`` with its BatchNorm shift ``beta - k * mean`` zero, so the folded bias is on the accumulator grid."""
    with torch.no_grad():
        model[1].running_mean.zero_()
        model[1].bias.zero_()
    return model


def run_onnx(
    graph: bytes, inputs: torch.Tensor, level: onnxruntime.GraphOptimizationLevel, optimized_path: str = ""
) -> torch.Tensor:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = optimized_path
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def stored_weights(graph: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Each layer weight's stored integers, found back from the DequantizeLinear (through a Cast) that yields it."""
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    producers = {node.output[0]: node for node in graph.graph.node}
    stored = {}
    for node in graph.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0].endswith(".weight"):
            source = node.input[0]
            if source not in initializers:
                assert producers[source].op_type == "Cast", producers[source]
                source = producers[source].input[0]
            stored[node.output[0]] = initializers[source]
    return stored


@pytest.mark.parametrize("symmetric", [True, False], ids=W4)
def test_w4_weights_are_stored_in_four_bits_and_compute_the_fake_quantized_numbers(symmetric: bool, tmp_path) -> None:
    element_type, (low, high) = W4["symmetric" if symmetric else "asymmetric"]
    inputs = torch.randn(128, 2, 10, 10, generator=torch.Generator().manual_seed(1))
    model = without_batchnorm_shift(
        trained_like_qat(conv_batchnorm_linear(), QuantConfig(weight_bits=4, symmetric=symmetric), inputs)
    )
    with torch.no_grad():
        expected = model(inputs)
    path = export(model, tmp_path / "w4.onnx", inputs[:1])
    graph = onnx.load(path)
    onnx.checker.check_model(graph, full_check=True)
    assert [(entry.domain, entry.version) for entry in graph.opset_import] == [("", FOUR_BIT_OPSET)]

    stored = stored_weights(graph)
    assert sorted(stored) == sorted(f"model.{name}.weight" for name in quantized_layers(model))
    for name, tensor in stored.items():
        shape = tuple(model.get_submodule(name.removeprefix("model.").removesuffix(".weight")).weight.shape)
        assert tensor.data_type == element_type and tuple(tensor.dims) == shape, name
        assert len(tensor.raw_data) == math.ceil(math.prod(shape) / 2), name  # two integers a byte
        integers = numpy_helper.to_array(tensor).astype(np.int64)
        assert low <= integers.min() and integers.max() <= high, name  # mirrored ones (negative BatchNorm scales) too

    level = onnxruntime.GraphOptimizationLevel
    optimized = str(tmp_path / "optimized.onnx")
    for as_run in (
        level.ORT_DISABLE_ALL,
        level.ORT_ENABLE_EXTENDED,
    ):  # as written, and with ONNX Runtime's integer kernels
        # the same integers on the same grids: float rounding differences only, as without BatchNorm at 8 bits
        torch.testing.assert_close(
            run_onnx(path.read_bytes(), inputs, as_run, optimized), expected, atol=1e-4, rtol=1e-4, msg=str(as_run)
        )
    # ONNX Runtime folds the Cast of the 4-bit constants and runs its int8 kernels, as for 8-bit weights
    operators = {node.op_type for node in onnx.load(optimized).graph.node}
    assert {"QLinearConv", "QGemm"} <= operators and not operators & {"Cast", "Conv", "Gemm"}, operators


def test_w4_batchnorm_shift_moves_few_activations_one_step() -> None:
    """A folded BatchNorm shift is rounded onto the accumulator grid (input scale x weight scale), ~18x coarser than at 8 bits.

    That moves a conv output by at most half an accumulator step, and an activation next to a rounding
    boundary one step: the tolerances of the int8 artifact trained on the digits
    (test_int8_artifact_predicts_as_the_fake_quantized_model) still hold.
    """
    inputs = torch.randn(128, 2, 10, 10, generator=torch.Generator().manual_seed(1))
    model = trained_like_qat(conv_batchnorm_linear(), QuantConfig(weight_bits=4), inputs)
    with torch.no_grad():
        expected = model(inputs)
    graph = onnx_bytes(model, inputs[:1])
    for as_run in (
        onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
        onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    ):
        predicted = run_onnx(graph, inputs, as_run)
        assert (predicted.argmax(1) == expected.argmax(1)).float().mean() >= 0.99, as_run
        assert (predicted - expected).abs().median() < 1e-3, as_run
        torch.testing.assert_close(
            predicted, expected, atol=0.05 * expected.abs().max().item(), rtol=0, msg=str(as_run)
        )


def test_w4_file_is_smaller_than_w8_by_half_the_weight_bytes() -> None:
    inputs = torch.randn(96, 2, 10, 10, generator=torch.Generator().manual_seed(2))
    files = {
        bits: onnx_bytes(trained_like_qat(conv_batchnorm_linear(), QuantConfig(weight_bits=bits), inputs), inputs[:1])
        for bits in (4, 8)
    }
    sizes = [module.weight.numel() for module in conv_batchnorm_linear() if isinstance(module, (nn.Conv2d, nn.Linear))]
    saved = sum(size - math.ceil(size / 2) for size in sizes)
    # each weight loses half its bytes; each layer gains one Cast node (its name, output and type: under 100 bytes)
    assert len(files[8]) - saved <= len(files[4]) <= len(files[8]) - saved + 100 * len(sizes)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_8bit_weights_stay_8bit_behind_dequantize_linear_at_the_float_graphs_opset(reduce_range) -> None:
    inputs = torch.randn(96, 2, 10, 10, generator=torch.Generator().manual_seed(3))
    model = conv_batchnorm_linear()
    float_graph = onnx.load_from_string(onnx_bytes(model, inputs[:1]))
    config = QuantConfig(weight_bits=8, reduce_range=reduce_range)
    graph = onnx.load_from_string(onnx_bytes(trained_like_qat(model, config, inputs), inputs[:1]))
    assert list(graph.opset_import) == list(float_graph.opset_import)
    assert "Cast" not in {node.op_type for node in graph.graph.node}  # DequantizeLinear reads the initializers
    stored = stored_weights(graph)
    # full 8-bit weights are stored as uint8 (128 higher, and their zero points), 7-bit ones as int8
    expected = TensorProto.INT8 if reduce_range else TensorProto.UINT8
    assert len(stored) == 3 and all(tensor.data_type == expected for tensor in stored.values())


def test_smallcnn_w4_file_is_at_most_016_of_its_float_file() -> None:
    """The issue's bar on the benchmark model (SmallCNN for Fashion-MNIST); random weights, the bytes do not depend on them."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, image_size=28)
    inputs = torch.randn(64, 1, 28, 28)
    float_bytes = len(onnx_bytes(model.eval(), inputs[:1]))
    w4_bytes = len(
        onnx_bytes(trained_like_qat(model, QuantConfig(weight_bits=4, activation_bits=8), inputs), inputs[:1])
    )
    # 4-bit weights are an eighth of float32; int32 biases, float scales and the graph's text make up the rest
    assert w4_bytes <= 0.16 * float_bytes, w4_bytes / float_bytes
