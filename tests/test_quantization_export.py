from __future__ import annotations

import copy
import importlib.util
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from digits import digits_module, fit_digits
from onnx import numpy_helper
from torch import nn

from lightning_compress import (
    Pruning,
    QuantizationAwareTraining,
    export,
    load_quantized,
)
from lightning_compress.analysis.cpu import cpu_flags
from lightning_compress.deploy import onnx_bytes
from lightning_compress.deploy.qdq import LARGEST_SIGNED_WEIGHT
from lightning_compress.quantization import (
    QuantConfig,
    calibrate,
    quantize_model,
    quantized_layers,
)


@pytest.fixture(scope="module")
def qat_digits(tmp_path_factory):
    """SmallCNN trained 3 epochs on the digits, 60% pruned, fake-quantized from epoch 1 (int8, 7-bit weights)."""
    callbacks = [
        Pruning(amount=0.6, schedule="oneshot", start_epoch=1),
        QuantizationAwareTraining(start_epoch=1, reduce_range=True),
    ]
    _, module, datamodule = fit_digits(tmp_path_factory.mktemp("qat"), callbacks, max_epochs=3)
    inputs = torch.cat([batch[0] for batch in datamodule.test_dataloader()])
    return module.eval(), inputs


def run_onnx(graph: bytes, inputs: torch.Tensor, optimized: bool = True) -> torch.Tensor:
    options = onnxruntime.SessionOptions()
    if not optimized:  # the QDQ graph as written: float operators on dequantized values
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def test_int8_artifact_predicts_as_the_fake_quantized_model(qat_digits) -> None:
    module, inputs = qat_digits
    with torch.no_grad():
        expected = module(inputs)
    graph = onnx_bytes(module, inputs[:1])
    onnx.checker.check_model(onnx.load_from_string(graph))
    for optimized in (False, True):  # as written, and with ONNX Runtime's integer kernels
        predicted = run_onnx(graph, inputs, optimized)
        agreement = (predicted.argmax(1) == expected.argmax(1)).float().mean().item()
        assert agreement >= 0.99, (optimized, agreement)
        # the same values rounded the same way, but for the int32 biases of the BatchNorm-folded convolutions, stored on
        # the grid of input scale x weight scale (an error up to 8.4e-5 in the first one here): it moves about 0.2% of the
        # next layer's inputs one step, which leaves most logits within 2e-3 of the fake-quantized model's
        assert (predicted - expected).abs().median() < 5e-3


def test_weights_are_stored_as_int8_with_the_pruned_zeros(qat_digits) -> None:
    module, inputs = qat_digits
    graph = onnx.load_from_string(onnx_bytes(module, inputs[:1]))
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.graph.initializer}
    dequantized_from = {
        node.output[0]: node.input[0] for node in graph.graph.node if node.op_type == "DequantizeLinear"
    }
    for name, layer in quantized_layers(module).items():
        stored = initializers[dequantized_from[f"model.{name}.weight"]]
        assert stored.dtype == np.int8 and stored.shape == tuple(layer.weight.shape)
        assert np.abs(stored).max() <= 63  # reduce_range: 7-bit weights
        assert (stored == 0).sum() == (layer.weight == 0).sum().item(), (
            name
        )  # zeros stay exactly zero, and only they round to zero here
    floats = sum(array.size for array in initializers.values() if array.dtype == np.float32)
    integers = sum(array.size for array in initializers.values() if array.dtype == np.int8)
    assert floats < 0.01 * integers  # only scales and the shape constant are float


def test_batchnorm_folding_is_exact_for_negative_scales_and_asymmetric_grids() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.7, 0.0, -2.0]))  # negative and zero BatchNorm scales
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    inputs = torch.randn(64, 2, 8, 8)
    for config in (QuantConfig(), QuantConfig(symmetric=False, per_channel=False), QuantConfig(activation_bits=4)):
        quantized = copy.deepcopy(model)
        quantize_model(quantized, config)
        calibrate(quantized, [inputs])
        with torch.no_grad():
            expected = quantized.eval()(inputs)
        predicted = run_onnx(onnx_bytes(quantized, inputs[:1]), inputs, optimized=False)
        # The folded weights are the same grid points. The folded BatchNorm shift joins the bias on the
        # accumulator grid, and a float ulp may move an activation one step: rare, small differences.
        difference = (predicted - expected).abs()
        assert difference.median() < 1e-4 and difference.mean() < 0.01 * expected.abs().max(), config
        torch.testing.assert_close(
            predicted, expected, atol=0.05 * expected.abs().max().item(), rtol=0, msg=str(config)
        )


def test_without_batchnorm_the_artifact_computes_the_same_numbers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_model(model, QuantConfig(reduce_range=True))
    inputs = torch.randn(256, 16)
    calibrate(model, inputs.split(64))
    with torch.no_grad():
        expected = model.eval()(inputs)
    for optimized in (False, True):
        torch.testing.assert_close(
            run_onnx(onnx_bytes(model, inputs[:1]), inputs, optimized), expected, atol=1e-4, rtol=1e-4
        )


def test_behind_a_relu_activations_stay_uint8_from_layer_to_layer(tmp_path) -> None:
    """A symmetric quantizer on non-negative inputs is unsigned (0 to 255): no int8 requantization between layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip
    quantize_model(model, QuantConfig(reduce_range=True))
    inputs = torch.randn(64, 1, 8, 8)
    calibrate(model, inputs.split(16))
    with torch.no_grad():
        expected = model.eval()(inputs)
    layers = quantized_layers(model)
    assert [layer.input_quantizer.quant_range for layer in layers.values()] == [
        (-128, 127),
        (0, 255),
        (0, 255),
        (0, 255),
    ]
    for layer in list(layers.values())[1:]:  # the whole observed range on 256 steps from zero
        assert layer.input_quantizer.scale.item() == pytest.approx(
            layer.input_quantizer.observer.max_val.item() / 255, rel=1e-6
        )

    graph = onnx_bytes(model, inputs[:1])
    initializers = {
        tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load_from_string(graph).graph.initializer
    }
    quantize_types = [
        initializers[node.input[2]].dtype
        for node in onnx.load_from_string(graph).graph.node
        if node.op_type == "QuantizeLinear"
    ]
    assert quantize_types[0] == np.int8 and set(quantize_types[1:]) == {np.dtype(np.uint8)}
    optimized = tmp_path / "optimized.onnx"
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    torch.testing.assert_close(
        torch.from_numpy(session.run(None, {"x": inputs.numpy()})[0]), expected, atol=1e-4, rtol=1e-4
    )
    operators = [node.op_type for node in onnx.load(optimized).graph.node]
    # one QuantizeLinear at the input, then integer kernels to the end: no ReLU, no DequantizeLinear in between
    assert operators.count("QuantizeLinear") == 1 and "DequantizeLinear" not in operators and "Relu" not in operators, (
        operators
    )
    assert operators.count("QLinearConv") == 2 and operators.count("QGemm") == 2, operators


def test_torch_format_loads_back_into_a_fresh_model(qat_digits, tmp_path) -> None:
    module, inputs = qat_digits
    path = export(module, tmp_path / "model.pt", inputs[:1], format="torch")
    fresh = load_quantized(digits_module().eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(inputs), module(inputs))
    onnx_path = export(module, tmp_path / "deploy" / "model.onnx", inputs[:1])
    assert onnx.load(onnx_path).graph.input[0].name == "x"
    with pytest.raises(ValueError, match="not a file written by export"):
        load_quantized(digits_module(), onnx_path)


def test_export_refuses_unknown_or_missing_formats(tmp_path, monkeypatch) -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="unknown export format 'tflite'; use one of onnx, torch"):
        export(model, tmp_path / "m", torch.zeros(1, 4), format="tflite")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(
        ImportError, match="needs onnxscript, which is not installed: pip install onnx onnxscript onnxruntime"
    ):
        export(model, tmp_path / "m.onnx", torch.zeros(1, 4))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "other_layers, reason",
    [
        (
            lambda: (nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)),
            "shapes (file vs model): 0.weight [3, 4] vs [5, 4], 0.bias [3] vs [5], 0.weight_quantizer.scale [3] vs [5] and 4 more",
        ),
        (
            lambda: (nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)),
            "missing keys: 4.weight, 4.bias",
        ),
        # layer 0 quantizes, then layer 2 is not there: nothing may stay quantized
        (
            lambda: (nn.Linear(4, 3), nn.Linear(3, 2)),
            "its quantized layers are not the model's: the pattern '2' matches no layer with a weight; near names: ['0', '1']",
        ),
    ],
    ids=["shapes", "keys", "layers"],
)
def test_a_file_of_another_architecture_leaves_the_model_unchanged(tmp_path, other_layers, reason: str) -> None:
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    quantize_model(saved, QuantConfig())
    path = export(saved, tmp_path / "model.pt", torch.zeros(1, 4), format="torch")
    other = nn.Sequential(*other_layers())
    types, state = (
        [type(module) for module in other.modules()],
        {name: value.clone() for name, value in other.state_dict().items()},
    )
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path} does not fit Sequential: {reason}')}$"):
        load_quantized(other, path)
    assert [type(module) for module in other.modules()] == types
    assert list(other.state_dict()) == list(state) and all(
        torch.equal(value, state[name]) for name, value in other.state_dict().items()
    )


@pytest.mark.parametrize("tokens", [False, True], ids=["gemm", "matmul-on-tokens"])
@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_integer_products_compute_the_models_numbers_on_cpus_without_vnni(tokens, reduce_range) -> None:
    """uint8 inputs near 255 times large positive int8 weights overflow the 16-bit sums of two products of x86 CPUs
    without VNNI (AVX2's VPMADDUBSW, 2 x 255 x 127 > 32,767): full 8-bit weights are stored as uint8, 128 higher, whose
    products every CPU sums in 32 bits; 7-bit ones cannot overflow and stay int8. Either way ONNX Runtime computes the
    fake-quantized model's numbers (on an AVX2 CPU, int8 8-bit weights were off by about 0.1 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.0)  # all positive: every pair of neighbouring products adds up
    quantize_model(model, QuantConfig(reduce_range=reduce_range))
    shape = (16, 5, 64) if tokens else (16, 64)
    inputs = torch.rand(shape, generator=torch.Generator().manual_seed(0))  # non-negative: a uint8 grid from zero
    calibrate(model, [inputs])
    graph = onnx.load_from_string(onnx_bytes(model, inputs[:1]))
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.graph.initializer}
    (weight,) = (array for array in values.values() if array.ndim == 2)
    if reduce_range:
        assert weight.dtype == np.int8 and np.abs(weight).max() == 63
    else:
        integers = model[0].weight_quantizer(model[0].weight) / model[0].weight_quantizer.scale.reshape(-1, 1)
        assert weight.dtype == np.uint8 and weight.max() == 255  # 127 + 128
        # the same integers, 128 higher (compared as sets: a MatMul holds the weight transposed, a Gemm does not)
        np.testing.assert_array_equal(
            np.sort(weight.astype(np.int64).ravel() - 128), np.sort(integers.round().long().numpy().ravel())
        )
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(graph.SerializeToString(), inputs), model(inputs), atol=1e-5, rtol=1e-5)


def conv_linear_on_positive_numbers(config: QuantConfig) -> tuple[nn.Module, torch.Tensor]:
    """A conv and a linear layer with all-positive weights, calibrated on non-negative inputs (uint8 grids from zero):
    the products that would overflow an AVX2 CPU's 16-bit pair sums if 8-bit int8 weights reached it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8)).eval()
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.weight.uniform_(0.5, 1.0)
    quantize_model(model, config)
    inputs = torch.rand((32, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    calibrate(model, [inputs])
    return model, inputs


def stored_weights(graph: onnx.ModelProto) -> list[np.ndarray]:
    """The integer weight initializers that the graph's DequantizeLinear nodes read (conv and linear)."""
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.graph.initializer}
    readers = [node.input[0] for node in graph.graph.node if node.op_type == "DequantizeLinear"]
    return [values[name] for name in readers if name in values and values[name].ndim >= 2]


@pytest.mark.parametrize(
    ("config", "storage", "largest"),
    [
        (QuantConfig(), np.int8, 63),  # the default: 7-bit weights, int8
        (QuantConfig(reduce_range=False), np.uint8, 255),  # full 8-bit weights for any x86 CPU: uint8, 127 + 128
        pytest.param(
            QuantConfig(target_cpu="vnni"),
            np.int8,
            127,  # full 8-bit weights for VNNI CPUs: int8
            marks=pytest.mark.skipif(
                not cpu_flags()["vnni"], reason="int8 weights beyond 64 are exact only on a CPU with VNNI"
            ),
        ),
    ],
    ids=["default-7-bit-int8", "8-bit-uint8-for-avx2", "8-bit-int8-for-vnni"],
)
def test_each_weight_storage_computes_the_fake_quantized_models_numbers(config, storage, largest) -> None:
    """The default export and both storages of full 8-bit weights, run by ONNX Runtime's integer kernels (QLinearConv,
    QGemm), give the fake-quantized model's outputs; the default's weights fit :data:`LARGEST_SIGNED_WEIGHT`, which
    no uint8 input can overflow on a CPU without VNNI, so it is exact there too."""
    model, inputs = conv_linear_on_positive_numbers(config)
    graph = onnx.load_from_string(onnx_bytes(model, inputs[:1]))
    weights = stored_weights(graph)
    assert len(weights) == 2 and all(weight.dtype == storage for weight in weights)
    assert max(int(np.abs(weight.astype(np.int64)).max()) for weight in weights) == largest
    if config == QuantConfig():
        assert config.weight_range == (-63, 63) and max(config.weight_range) <= LARGEST_SIGNED_WEIGHT
    with torch.no_grad():
        expected = model(inputs)
    torch.testing.assert_close(run_onnx(graph.SerializeToString(), inputs), expected, atol=1e-5, rtol=1e-5)
