"""Quantized Conv, Linear and Embedding layers, and the function that turns a model's layers into them in place.

A quantized layer is the same module object with its class switched to a subclass
(``nn.Conv2d`` becomes :class:`QuantizedConv2d`) and two quantizers added: one for its input
activations, one for its weight. Its parameters stay where they were, under the same names, so
optimizers, pruning masks and ``state_dict`` keys of the weights are untouched; the quantizers add
their own keys (scales, zero points, observer ranges, switches).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.fake_quant import FakeQuantizer
from lightning_compress.quantization.observers import Observer
from lightning_compress.targets import TargetSpec, explicit_fused_attention, select_layers, warn_if_few_targeted


class QuantizedLayer(nn.Module):
    """Mixin of the quantized layers: fake-quantize the input, the weight and the bias, then compute as the float layer.

    The bias is rounded onto the accumulator's grid (step ``input scale * weight scale``, range of
    ``quant_config.bias_bits``), as an integer runtime adds it; its gradient passes straight through. A
    layer whose input is not a tensor of numbers to quantize (an embedding's token ids), or whose weight
    is quantized alone (``QuantConfig.group_size``: its input and bias stay float), has no
    ``input_quantizer`` (``None``).
    """

    input_quantizer: FakeQuantizer | None
    weight_quantizer: FakeQuantizer
    quant_config: QuantConfig
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._compute(x, self.weight_quantizer(self.weight), self._quantized_bias())

    def _quantized_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.input_quantizer is None or not bool(self.weight_quantizer.enabled):
            return self.bias
        scale = (self.input_quantizer.scale * self.weight_quantizer.scale).detach().expand(self.bias.shape).contiguous()
        zero_point = torch.zeros(self.bias.shape, dtype=torch.int32, device=self.bias.device)
        bias = self.bias.float()  # on the grid in float32, as the quantizers round (see FakeQuantizer)
        quantized = torch.fake_quantize_per_channel_affine(bias, scale, zero_point, 0, *self.quant_config.bias_range)
        return quantized.to(self.bias.dtype)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def output_channel_state(self) -> dict[str, torch.Tensor]:
        """The weight quantizer's per-output-channel tensors (scale, zero point, observed ranges), named
        relative to the layer; empty when the weight is quantized per tensor. Channel removal cuts them
        along with the weight's rows (a weight with scales per group of columns is not cut: channel removal
        refuses it)."""
        quantizer = self.weight_quantizer
        if quantizer.channel_axis is None or quantizer.group_size is not None:
            return {}
        tensors = [*quantizer.named_parameters(), *quantizer.named_buffers()]
        return {f"weight_quantizer.{name}": tensor for name, tensor in tensors if tensor.dim() == 1}


class _QuantizedConv(QuantizedLayer):
    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class QuantizedConv1d(_QuantizedConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized input and weight (made by :func:`quantize_model`)."""


class QuantizedConv2d(_QuantizedConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weight (made by :func:`quantize_model`).

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(1, 2, 3)
        >>> _ = quantize_model(torch.nn.Sequential(conv), QuantConfig())
        >>> type(conv).__name__, isinstance(conv, torch.nn.Conv2d)
        ('QuantizedConv2d', True)
    """


class QuantizedConv3d(_QuantizedConv, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized input and weight (made by :func:`quantize_model`)."""


class QuantizedLinear(QuantizedLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weight (made by :func:`quantize_model`)."""

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


class QuantizedEmbedding(QuantizedLayer, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table, one scale per row (made by :func:`quantize_model` when
    ``nn.Embedding`` is among its targets): weight-only, since its inputs are token ids.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
        >>> sorted(type(layer).__name__ for layer in quantize_model(model, QuantConfig(), targets=[torch.nn.Embedding, torch.nn.Linear]).values())
        ['QuantizedEmbedding', 'QuantizedLinear']
    """

    input_quantizer = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids,
            self.weight_quantizer(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


QUANTIZED_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
    nn.Linear: QuantizedLinear,
    nn.Embedding: QuantizedEmbedding,
}


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    targets: TargetSpec = None,
    exclude: TargetSpec = None,
    warn: Callable[[str], Any] = warnings.warn,
) -> dict[str, QuantizedLayer]:
    """Turn the selected ``Conv1d/2d/3d`` and ``Linear`` layers of ``model`` into quantized layers, in place;
    ``nn.Embedding`` tables too where ``targets`` names the type (weight-only, one scale per row).

    Layers already quantized are left as they are, so calling it again is harmless. Quantizers start
    observing and disabled: switch them with :func:`set_quantization`. Returns the quantized layers by name.
    ``warn`` is told when these layers hold under a quarter of the model's parameters.
    Other layer types (a transposed convolution, a subclass) stay in float; targeting one explicitly, or
    leaving nothing to quantize, raises ``ValueError``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
        >>> list(quantize_model(model, QuantConfig(weight_bits=4)))
        ['0', '3']
    """
    explicit_fused_attention(model, "Quantization", warn)
    layers = select_layers(model, targets, exclude)
    unsupported = {
        name: type(m).__name__
        for name, m in layers.items()
        if not isinstance(m, QuantizedLayer) and type(m) not in QUANTIZED_TYPES
    }
    if unsupported and targets is not None:
        raise ValueError(
            f"these targets cannot be quantized (only plain {', '.join(t.__name__ for t in QUANTIZED_TYPES)}): {unsupported}"
        )
    quantized = {name: m for name, m in layers.items() if name not in unsupported}
    if not quantized:
        raise ValueError(
            f"{type(model).__name__} has no layer to quantize: plain {', '.join(t.__name__ for t in QUANTIZED_TYPES)} are supported"
        )
    for name, layer in quantized.items():
        check_groups(layer, config, name)
    warn_if_few_targeted(model, quantized, "Quantization", warn)
    for layer in quantized.values():
        quantize_layer(layer, config)
    return quantized


def quantize_layer(layer: nn.Module, config: QuantConfig) -> QuantizedLayer:
    """Turn one plain ``Conv1d/2d/3d``, ``Linear`` or ``Embedding`` into its quantized layer in place (a quantized
    layer is left as it is), with quantizers observing and disabled.

    Example:
        >>> from torch import nn
        >>> type(quantize_layer(nn.Embedding(10, 4), QuantConfig())).__name__
        'QuantizedEmbedding'
    """
    if isinstance(layer, QuantizedLayer):
        return layer
    if type(layer) not in QUANTIZED_TYPES:
        raise ValueError(
            f"{type(layer).__name__} cannot be quantized (only plain {', '.join(t.__name__ for t in QUANTIZED_TYPES)})"
        )
    check_groups(layer, config, type(layer).__name__)
    channels = layer.weight.shape[0] if config.per_channel else None
    if config.group_size is not None:
        channels = layer.weight.numel() // config.group_size
    weight_observer = Observer("latest", channels=channels)
    device = layer.weight.device
    layer.__class__ = QUANTIZED_TYPES[type(layer)]
    layer.quant_config = config
    layer.weight_quantizer = FakeQuantizer(
        weight_observer,
        config.weight_range,
        config.symmetric,
        channel_axis=0 if config.per_channel else None,
        learnable=config.learnable_scales,
        group_size=config.group_size,
    ).to(device)
    if config.group_size is not None:  # weight-only: the input stays float
        layer.register_module("input_quantizer", None)
    elif not isinstance(layer, nn.Embedding):  # token ids in: weight-only
        layer.input_quantizer = FakeQuantizer(
            Observer.for_activations(config),
            config.activation_range,
            config.activations_symmetric,
            learnable=config.learnable_scales,
            unsigned_when_non_negative=config.activations_symmetric,
        ).to(device)
    return layer


def check_groups(layer: nn.Module, config: QuantConfig, name: str) -> None:
    """Fail unless ``config``'s scales per group of input columns, if any, fit ``layer``: an ``nn.Linear`` whose
    input features ``group_size`` divides.

    Example:
        >>> from torch import nn
        >>> check_groups(nn.Linear(96, 8), QuantConfig(group_size=64), "head")
        Traceback (most recent call last):
        ...
        ValueError: group_size=64 must divide the 96 input features of head (Linear)
    """
    size = config.group_size
    if size is None:
        return
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"group_size={size} groups the input columns of linear layers; {name} is a {type(layer).__name__}: "
            "quantize it with another QuantConfig, or exclude it"
        )
    if layer.in_features % size:
        raise ValueError(
            f"group_size={size} must divide the {layer.in_features} input features of {name} ({type(layer).__name__})"
        )


def dequantize_layer(layer: QuantizedLayer) -> None:
    """Turn a quantized layer back into its plain float class in place, removing its quantizers and settings."""
    float_type = next(
        float_type for float_type, quantized_type in QUANTIZED_TYPES.items() if type(layer) is quantized_type
    )
    del layer.weight_quantizer, layer.quant_config
    if "input_quantizer" in layer._modules:
        del layer.input_quantizer
    layer.__class__ = float_type


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The quantized layers of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Every fake quantizer in ``model`` (inputs and weights of its quantized layers)."""
    return [module for module in model.modules() if isinstance(module, FakeQuantizer)]


def set_quantization(model: nn.Module, *, enabled: bool | None = None, observing: bool | None = None) -> None:
    """Switch fake quantization and observers of every quantizer in ``model`` (``None`` leaves a switch as it is)."""
    for quantizer in quantizers(model):
        if enabled is not None:
            quantizer.enabled.fill_(enabled)
        if observing is not None:
            quantizer.observing.fill_(observing)
