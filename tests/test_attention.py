"""nn.MultiheadAttention made explicit: the same outputs, and projections that quantization reaches."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from lightning_compress.analysis import count_macs
from lightning_compress.deploy.onnx import onnx_bytes
from lightning_compress.models.attention import ExplicitMultiheadAttention, explicit_attention
from lightning_compress.pruning import Pruner, PruningConfig
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model, quantized_layers


def pair(batch_first: bool = True, **options) -> tuple[nn.MultiheadAttention, ExplicitMultiheadAttention]:
    torch.manual_seed(0)
    fused = nn.MultiheadAttention(16, 4, batch_first=batch_first, **options).eval()
    return fused, ExplicitMultiheadAttention.from_fused(fused).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_explicit_attention_computes_what_the_fused_one_does(batch_first, need_weights, average) -> None:
    fused, explicit = pair(batch_first)
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    additive = torch.randn(7, 7)
    for masks in (
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal},
        {"attn_mask": additive},
        {"key_padding_mask": padding, "attn_mask": causal},
    ):
        options = {"need_weights": need_weights, "average_attn_weights": average, **masks}
        expected, expected_weights = fused(x, x, x, **options)
        output, weights = explicit(x, x, x, **options)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
        else:
            assert weights is None and expected_weights is None
    unbatched = x[0] if batch_first else x[:, 0]
    torch.testing.assert_close(
        explicit(unbatched, unbatched, unbatched)[0], fused(unbatched, unbatched, unbatched)[0], atol=1e-5, rtol=1e-5
    )


def test_what_cannot_be_made_explicit_is_refused() -> None:
    with pytest.raises(ValueError, match="it has kdim or vdim other than embed_dim, add_bias_kv"):
        ExplicitMultiheadAttention.from_fused(nn.MultiheadAttention(16, 4, kdim=8, add_bias_kv=True))


def test_a_transformer_encoder_keeps_its_outputs_and_its_attention_is_quantized(tmp_path) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():  # the encoder clones its layer: as trained layers would, the two differ
        for parameter in encoder.layers[1].parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    x = torch.randn(4, 6, 16)
    expected = encoder(x)  # in eval mode: torch's fused fast path
    assert explicit_attention(encoder) == 2
    torch.testing.assert_close(encoder(x), expected, atol=1e-5, rtol=1e-5)
    assert len(quantize_model(encoder, QuantConfig())) == 2 * (4 + 2)  # q, k, v, out and the MLP's two
    calibrate(encoder, [x])
    graph = onnx_bytes(encoder.eval(), x[:1])
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(outputs, encoder(x).numpy(), atol=1e-4)


def test_a_vision_transformer_keeps_its_outputs_and_every_linear_layer_is_quantized() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    ).eval()
    images = torch.randn(2, 3, 28, 28)
    expected = vit(images)
    assert explicit_attention(vit) == 2
    torch.testing.assert_close(vit(images), expected, atol=1e-5, rtol=1e-5)
    quantize_model(vit, QuantConfig())
    assert sum(isinstance(layer, nn.Linear) for layer in quantized_layers(vit).values()) == 2 * 6 + 1


class BiasedKeys(nn.Module):
    """An attention with biases on its keys and values (``add_bias_kv``), which ExplicitMultiheadAttention lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0])


def test_fused_attention_left_in_float_is_said_loudly_and_explicit_attention_is_not() -> None:
    with pytest.warns(
        UserWarning,
        match=r"leaves the 1 nn.MultiheadAttention layer \(attention\) in float, .*\(attention: add_bias_kv\)$",
    ):
        quantize_model(BiasedKeys(), QuantConfig())
    explicit = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2, enable_nested_tensor=False
    )
    explicit_attention(explicit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(explicit, QuantConfig())


def test_macs_of_the_fused_fast_paths_are_counted_as_those_of_the_explicit_layers() -> None:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2, enable_nested_tensor=False
    )
    x = torch.randn(3, 6, 16)
    fused = count_macs(encoder, x)  # in eval mode one aten._transformer_encoder_layer_fwd per layer
    explicit_attention(encoder)
    batch, length, width, hidden = 3, 6, 16, 32
    per_layer = batch * length * (4 * width * width + 2 * width * hidden) + 2 * batch * length * length * width
    assert fused == count_macs(encoder, x) == 2 * per_layer


class TextEncoder(nn.Module):
    """Token ids through an embedding, a two-layer transformer encoder and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(ids)).mean(dim=1))


def test_channel_pruning_that_would_break_the_attention_heads_is_refused_naming_the_layers() -> None:
    torch.manual_seed(0)
    model = TextEncoder().eval()
    explicit_attention(model)
    ids = torch.randint(0, 100, (2, 7))
    config = PruningConfig(amount=0.5, granularity="channel", scope="layer")
    # The heads' channels, and the residual width, which LayerNorm reads whole (masked, its statistics differ):
    culprits = (
        r"\['encoder.layers.0.self_attn.v_proj', 'encoder.layers.1.self_attn.v_proj', 'encoder.layers.1.linear2'\]"
    )
    with pytest.raises(
        ValueError, match=rf"would break TextEncoder \(RuntimeError: shape .*\): removing the units of {culprits}"
    ):
        Pruner(model, config, example_input=ids[:1])
    pruner = Pruner(model, dataclasses.replace(config, exclude=("*.self_attn.*",)), example_input=ids[:1])
    assert list(pruner.groups.units) == ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    pruner.prune()
    with torch.no_grad():
        masked = model(ids)
        pruner.remove_channels(model)
        torch.testing.assert_close(model(ids), masked)
    assert model.encoder.layers[0].linear1.out_features == 64
