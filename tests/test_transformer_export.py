"""Quantized transformers in ONNX: every linear layer of a BERT as integers, run by ONNX Runtime's integer kernels."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hydra.utils import instantiate
from onnx import numpy_helper
from text_models import TINY_BERT_LINEAR_LAYERS, fit_text, sample_datamodule, text_module
from torch import nn

from lightning_compress import CompressionReport, QuantizationAwareTraining, export, load_compressed, load_quantized
from lightning_compress.deploy.onnx import onnx_bytes
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model, quantized_layers

INTEGER_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT8, onnx.TensorProto.UINT4)


def run_and_optimize(graph: bytes, inputs: torch.Tensor, optimized_path) -> tuple[np.ndarray, Counter]:
    """ONNX Runtime's outputs on ``inputs``, and the operators of the graph it optimized and ran."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized_path)
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    return outputs, Counter(node.op_type for node in onnx.load(str(optimized_path)).graph.node)


@pytest.mark.parametrize(
    "config",
    [QuantConfig(), QuantConfig(weight_bits=4), QuantConfig(activation_symmetric=False, reduce_range=True)],
    ids=["int8", "int4-weights", "uint8-activations"],
)
def test_every_linear_layer_of_a_bert_is_integer_in_onnx_and_runs_in_integer_kernels(tmp_path, config) -> None:
    model = text_module().model.eval()
    quantize_model(model, config)
    assert len(quantized_layers(model)) == TINY_BERT_LINEAR_LAYERS
    ids = torch.randint(1, 900, (16, 16), generator=torch.Generator().manual_seed(0))
    calibrate(model, [ids])
    graph = onnx_bytes(model.eval(), ids[:1])
    initializers = onnx.load_from_string(graph).graph.initializer
    integer_weights = [tensor for tensor in initializers if tensor.data_type in INTEGER_TYPES and len(tensor.dims) == 2]
    float_matrices = sorted(
        tuple(t.dims) for t in initializers if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
    )
    assert len(integer_weights) == TINY_BERT_LINEAR_LAYERS
    # in float only the token-type and word embeddings (the exporter folds the positions' into a 3-D constant)
    assert float_matrices == [(2, 16), (930, 16)]
    nodes, by_name = onnx.load_from_string(graph).graph.node, {tensor.name: tensor for tensor in initializers}
    activations = {by_name[node.input[2]].data_type for node in nodes if node.op_type == "QuantizeLinear"}
    weights = {tensor.data_type for tensor in integer_weights}
    if config.activation_symmetric is False:  # ONNX Runtime's pairing for transformers: uint8 inputs, int8 weights
        assert activations == {onnx.TensorProto.UINT8} and weights == {onnx.TensorProto.INT8}
    if config == QuantConfig():  # 7-bit weights by default: int8, exact in the u8 x s8 kernels of every x86 CPU
        assert weights == {onnx.TensorProto.INT8}
    # integer matrix products read uint8 (x86's u8 x s8 kernels): a symmetric grid shifted by 128, zero point 128
    product_zero_points = [by_name[node.input[2]] for node in nodes if node.op_type == "MatMulInteger"]
    assert {tensor.data_type for tensor in product_zero_points} == {onnx.TensorProto.UINT8}
    if config.activation_symmetric:
        assert {int(numpy_helper.to_array(tensor)) for tensor in product_zero_points} == {128}
    outputs, optimized = run_and_optimize(graph, ids, tmp_path / "optimized.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(outputs, model(ids).numpy(), atol=1e-5)
    # the 12 encoder layers on (batch, tokens, features) in ONNX Runtime's integer MatMul, the head in QGemm
    assert optimized["MatMulIntegerToFloat"] == TINY_BERT_LINEAR_LAYERS - 1 and optimized["QGemm"] == 1


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_residual_sums_before_layer_norms_stay_unfused_in_onnx_runtime(tmp_path, quantized) -> None:
    model = text_module().model.eval()
    ids = torch.randint(1, 900, (4, 16), generator=torch.Generator().manual_seed(0))
    if quantized:
        quantize_model(model, QuantConfig(activation_symmetric=False))
        calibrate(model, [ids])
    graph = onnx.load_from_string(onnx_bytes(model.eval(), ids[:1]))
    producers = {output: node for node in graph.graph.node for output in node.output}
    norms = [node for node in graph.graph.node if node.op_type == "LayerNormalization"]
    # two norms a layer, after attention and after the MLP, each after its residual sum; the embeddings' norm
    # follows the token embeddings plus a constant (the exporter folds the position embeddings), left an Add
    assert [producers[norm.input[0]].op_type for norm in norms] == ["Add"] + ["Sum"] * 2 * 2
    outputs, optimized = run_and_optimize(graph.SerializeToString(), ids, tmp_path / "optimized.onnx")
    assert optimized["SkipLayerNormalization"] == 0 and optimized["LayerNormalization"] == len(norms)
    with torch.no_grad():
        expected = model(ids).numpy()
    np.testing.assert_allclose(outputs, expected, atol=1e-5 if not quantized else 0.05)


def test_a_linear_layer_on_tokens_keeps_its_bias_on_the_accumulator_grid(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    quantize_model(model, QuantConfig())
    inputs = torch.randn(32, 5, 8)
    calibrate(model, [inputs])
    graph = onnx_bytes(model.eval(), inputs[:1])
    outputs, optimized = run_and_optimize(graph, inputs, tmp_path / "optimized.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(outputs, model(inputs).numpy(), atol=1e-6)
    # behind the ReLU the second layer's uint8 grid clips at zero: ONNX Runtime drops the ReLU; each bias is added
    # in the integer matrix product's kernel, a whole number of steps of its accumulator (input step x weight scale)
    assert optimized == Counter({"QuantizeLinear": 2, "MatMulIntegerToFloat": 2})
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    scales = {node.output[0]: values[node.input[1]] for node in graph.node if node.op_type == "QuantizeLinear"}
    layers = {layer.out_features: layer for layer in (model[0], model[2])}
    for node in (node for node in graph.node if node.op_type == "MatMulIntegerToFloat"):
        unit, accumulator_steps, bias = (values[node.input[index]] for index in (2, 3, 6))
        weight_scale = layers[len(bias)].weight_quantizer.scale.reshape(-1).numpy()
        assert unit == 1
        np.testing.assert_allclose(accumulator_steps, scales[node.input[0]] * weight_scale, rtol=1e-6)
        assert np.abs(bias).max() > 0
        steps = bias / accumulator_steps
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


def test_layers_whose_weights_are_equal_on_tokens_are_refused_not_mixed_up() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).eval()
    with torch.no_grad():
        model[1].load_state_dict(model[0].state_dict())
    quantize_model(model, QuantConfig())
    calibrate(model, [torch.randn(8, 3, 4)])
    with pytest.raises(
        RuntimeError, match=r"layers with equal weights \(nn.TransformerEncoder clones its layer\) cannot be told apart"
    ):
        onnx_bytes(model.eval(), torch.randn(1, 3, 4))


def test_quantization_aware_training_of_a_bert_exports_what_it_trained(tmp_path) -> None:
    module = text_module()
    report = CompressionReport(
        latency_batch_sizes=[1], latency_repeats=2, latency_rounds=2, latency_runtime="onnxruntime", verbose=False
    )
    fit_text(tmp_path, module, [QuantizationAwareTraining(start_epoch=0), report])
    before, after = (report.report.entry(name).profile for name in ("before", "after"))
    assert before.quantized_layers == 0 and after.quantized_layers == TINY_BERT_LINEAR_LAYERS
    path = export(module, tmp_path / "model.onnx", module.example_input_array)
    datamodule = sample_datamodule(batch_size=8)
    datamodule.setup()
    ids, _ = next(iter(datamodule.val_dataloader()))
    outputs, _ = run_and_optimize(path.read_bytes(), ids, tmp_path / "optimized.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(outputs, module.eval()(ids).numpy(), atol=1e-4)


@pytest.mark.parametrize(("weight_bits", "symmetric"), [(8, True), (4, True), (8, False)])
def test_embedding_tables_are_stored_as_integers_and_looked_up_row_by_row(tmp_path, weight_bits, symmetric) -> None:
    module = text_module()
    model = module.model.eval()
    layers = quantize_model(
        model, QuantConfig(weight_bits=weight_bits, symmetric=symmetric), targets=[nn.Linear, nn.Embedding]
    )
    assert len(layers) == TINY_BERT_LINEAR_LAYERS + 3  # and the word, position and token-type tables
    ids = torch.randint(1, 900, (16, 16), generator=torch.Generator().manual_seed(0))
    calibrate(model, [ids])
    graph = onnx_bytes(model.eval(), ids[:1])
    initializers = onnx.load_from_string(graph).graph.initializer
    integer_tables = sorted(
        tuple(t.dims)
        for t in initializers
        if t.data_type in INTEGER_TYPES and "embeddings" in t.name and len(t.dims) == 2
    )
    floats = sorted(tuple(t.dims) for t in initializers if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)
    assert integer_tables == [(2, 16), (930, 16)]  # token types, words
    # in float only one scale (and zero point) a row, and the positions' lookup the exporter folded
    assert floats == sorted([(1, 16, 16), *[(2, 1), (930, 1)] * (1 if symmetric else 2)])
    outputs, _ = run_and_optimize(graph, ids, tmp_path / "optimized.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(outputs, model(ids).numpy(), atol=1e-5)
    saved = export(module, tmp_path / "model.pt", module.example_input_array, format="torch")
    compressed = export(module, tmp_path / "model.lcz", module.example_input_array, format="compressed")
    for fresh in (load_quantized(text_module(seed=1), saved), load_compressed(text_module(seed=1), compressed)):
        with torch.no_grad():
            assert torch.equal(fresh.eval()(ids), module.eval()(ids))


def test_the_transformer_ptq_recipe_calibrates_a_bert_in_a_fit_and_exports_integers(compose_config, tmp_path) -> None:
    cfg = compose_config("compression/quantization=int8_ptq_transformer", f"output_dir={tmp_path}")
    ptq = instantiate(cfg.compression.quantization, _convert_="all")
    module = text_module()
    fit_text(tmp_path, module, [ptq])
    layers = quantized_layers(module)
    assert len(layers) == TINY_BERT_LINEAR_LAYERS + 3 and all(
        bool(layer.weight_quantizer.enabled) for layer in layers.values()
    )
    datamodule = sample_datamodule(batch_size=8)
    datamodule.setup()
    ids, _ = next(iter(datamodule.val_dataloader()))
    path = export(module, tmp_path / "model.onnx", module.example_input_array)
    outputs, optimized = run_and_optimize(path.read_bytes(), ids, tmp_path / "optimized.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(outputs, module.eval()(ids).numpy(), atol=1e-4)
    assert optimized["MatMulIntegerToFloat"] == TINY_BERT_LINEAR_LAYERS - 1
