"""The small vision transformer: its patches, its explicit attention, and its int8 ONNX graph in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lightning_compress.deploy.onnx import onnx_bytes
from lightning_compress.models.attention import ExplicitMultiheadAttention
from lightning_compress.models.vit import vision_transformer
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model, quantized_layers


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return vision_transformer(num_classes=10, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32).eval()


def test_the_vision_transformer_reads_one_channel_patches_through_explicit_attention() -> None:
    model = small_vit()
    assert model.conv_proj.in_channels == 1 and model.conv_proj.kernel_size == (7, 7)
    assert model.seq_length == 4 * 4 + 1  # 16 patches and the class token
    assert all(isinstance(block.self_attention, ExplicitMultiheadAttention) for block in model.encoder.layers)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="image_size 32 must be a multiple of patch_size 7"):
        vision_transformer(num_classes=10, image_size=32)


def test_every_weight_layer_of_the_vision_transformer_is_int8_in_onnx_and_agrees_with_torch() -> None:
    model = small_vit()
    quantize_model(model, QuantConfig())
    layers = quantized_layers(model)
    assert len(layers) == 1 + 2 * 6 + 1  # the patch embedding, q, k, v, out and the MLP's two per block, the head
    images = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calibrate(model, [images])
    graph = onnx_bytes(model.eval(), images[:1])
    initializers = onnx.load_from_string(graph).graph.initializer
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # full 8-bit weights are stored as uint8 (qdq.py)
    weights = [tensor for tensor in initializers if tensor.data_type in eight_bit and len(tensor.dims) >= 2]
    expected_shapes = [
        tuple(layer.weight.shape) if name in ("conv_proj", "heads.head") else tuple(layer.weight.shape)[::-1]
        for name, layer in layers.items()
    ]  # the encoder's layers read (batch, tokens, features): MatMul, whose weight is stored transposed
    assert sorted(tuple(tensor.dims) for tensor in weights) == sorted(expected_shapes)
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(outputs, expected, atol=1e-4)
