"""The integer form of a model's fake-quantized layers: their integers, scales and grids, as their forward rounds them.

:func:`split_quantization` separates a fake-quantized model into a float model that computes the same
numbers and the integer form of each quantized layer; the QDQ export (:mod:`.qdq`) and the compressed
file (:mod:`.compressed`) are written from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from lightning_compress.modules import eval_mode, model_copy
from lightning_compress.quantization.layers import (
    QuantizedLayer,
    dequantize_layer,
    quantized_layers,
)


@dataclass(frozen=True)
class IntegerLayer:
    """The integer form of one quantized layer, read from its fake quantizers (an embedding, and a weight quantized
    alone, have no input grid). The weight's scales and zero points are one an output channel, ``(out,)``, or
    with ``group_size`` one an output channel and group of input columns, ``(out, in // group_size)``.
    ``target_cpu`` is the layer's ``QuantConfig.target_cpu``, for which the export picks the weight's storage.

    Example:
        >>> import torch
        >>> from lightning_compress.quantization import QuantConfig, quantize_model, set_quantization
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False))
        >>> _ = quantize_model(model, QuantConfig())
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -0.5]]))
        >>> _ = model(torch.tensor([[0.0, 2.0]]))   # observe
        >>> set_quantization(model, enabled=True)
        >>> IntegerLayer.of(model[0].eval()).weight
        array([[ 63, -31]])
    """

    weight: np.ndarray
    weight_scale: np.ndarray
    weight_zero_point: np.ndarray
    weight_range: tuple[int, int]
    input_scale: float | None
    input_zero_point: int | None
    input_range: tuple[int, int] | None
    bias_range: tuple[int, int]
    group_size: int | None = None
    target_cpu: str = "avx2"

    @classmethod
    @torch.no_grad()
    def of(cls, layer: QuantizedLayer) -> IntegerLayer:
        """Read ``layer`` (in eval mode, fake quantization enabled): integers exactly as its forward rounds them."""
        quantizer = layer.weight_quantizer
        channels = layer.weight.shape[0]
        if quantizer.group_size is not None:  # (out, groups), row by row as the quantizer holds them
            scale, zero_point = quantizer.scale.reshape(channels, -1), quantizer.zero_point.reshape(channels, -1)
        else:  # one a channel, or one a tensor for every channel
            scale = quantizer.scale.reshape(-1).expand(channels)
            zero_point = quantizer.zero_point.reshape(-1).expand(channels)
        scale = scale.detach().float()
        rounded = quantizer(layer.weight).detach().float()  # (q - z) * s, computed by the same operator as training
        integers = torch.round(rounded / _per_weight(scale, rounded)) + _per_weight(zero_point, rounded)
        inputs = layer.input_quantizer  # None for an embedding (token ids in) and a weight quantized alone
        return cls(
            weight=integers.long().cpu().numpy(),
            weight_scale=scale.cpu().numpy(),
            weight_zero_point=zero_point.long().cpu().numpy(),
            weight_range=(quantizer.quant_min, quantizer.quant_max),
            input_scale=None if inputs is None else float(inputs.scale.reshape(-1)[0]),
            input_zero_point=None if inputs is None else int(inputs.zero_point.reshape(-1)[0]),
            input_range=None if inputs is None else (inputs.quant_min, inputs.quant_max),
            bias_range=layer.quant_config.bias_range,
            group_size=quantizer.group_size,
            target_cpu=layer.quant_config.target_cpu,
        )

    def dequantized_weight(self) -> torch.Tensor:
        """``(q - z) * s``: the float weight the fake-quantized layer computes with."""
        centered = self.weight - _per_weight(self.weight_zero_point, self.weight)
        return torch.from_numpy((centered * _per_weight(self.weight_scale, self.weight)).astype(np.float32))

    def fit_to(self, exported: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Integers, scales and zero points whose dequantized values are ``exported``, the weight as the graph holds it.

        The exporter may have folded a BatchNorm into the weight, multiplying each output channel by a
        factor k: the same integers then hold with scale ``s·|k|``, mirrored inside the range where k < 0.
        """
        low, high = self.weight_range
        channels = self.weight.shape[0]
        dequantized = self.dequantized_weight().double().numpy().reshape(channels, -1)
        target = exported.astype(np.float64).reshape(channels, -1)
        norm = (dequantized**2).sum(1)
        factor = np.where(norm > 0, (dequantized * target).sum(1) / np.where(norm > 0, norm, 1.0), 1.0)
        error = np.abs(dequantized * factor[:, None] - target).max(initial=0.0)
        if error > 1e-4 * max(np.abs(target).max(initial=0.0), 1e-12):
            raise RuntimeError(
                f"the exported weight {name!r} is not a per-channel multiple of its quantized weight (error {error:.3g})"
            )
        per_grid = factor.reshape((-1,) + (1,) * (self.weight_scale.ndim - 1))  # a row's factor, for each of its grids
        flip = per_grid < 0
        integers = np.where(_per_weight(flip, self.weight), low + high - self.weight, self.weight)
        zero_point = np.where(flip, low + high - self.weight_zero_point, self.weight_zero_point)
        integers = np.where(_per_weight(per_grid == 0, self.weight), _per_weight(zero_point, self.weight), integers)
        scale = np.where(per_grid != 0, self.weight_scale * np.abs(per_grid), self.weight_scale)
        return integers, scale.astype(np.float32), zero_point


Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _per_weight(grids: Array, weight: Array) -> Array:
    """A weight's per-grid values (a scale, a zero point: ``(out,)``, or ``(out, groups)`` for groups of columns)
    shaped to broadcast over ``weight``, each element meeting its grid's."""
    if grids.ndim == 2:
        size = weight.shape[1] // grids.shape[1]
        return np.repeat(grids, size, axis=1) if isinstance(grids, np.ndarray) else grids.repeat_interleave(size, 1)
    return grids.reshape((-1,) + (1,) * (weight.ndim - 1))


def split_quantization(model: nn.Module, prefix: str = "") -> tuple[nn.Module, dict[str, IntegerLayer]]:
    """A float copy of ``model`` that computes what it computes, and the integer form of its quantized layers.

    In the copy, each layer whose fake quantization is on is a plain float layer again with its
    dequantized weight ``(q - z)·s``; the returned mapping, keyed by ``prefix + <layer>.weight`` (the
    name the exported graph gives that weight), holds its integers and grids for :func:`to_qdq`.
    Layers with fake quantization off compute in float and stay out of the mapping.
    """
    copy = model_copy(model)
    integer_layers = {}
    with eval_mode(copy):
        for name, layer in quantized_layers(copy).items():
            if bool(layer.weight_quantizer.enabled):
                integer = IntegerLayer.of(layer)
                integer_layers[f"{prefix}{name}.weight"] = integer
                with torch.no_grad():
                    layer.weight.copy_(integer.dequantized_weight())
            dequantize_layer(layer)
    return copy, integer_layers
