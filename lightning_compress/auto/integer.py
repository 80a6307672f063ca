"""8-bit integer layers for :class:`~lightning_compress.AutoCompression`'s ``int8`` method (objectives ``latency``
and ``onnx_bytes``): the layers ONNX Runtime then runs in its integer kernels.

The targeted layers become quantized layers when the search is set up, with fake quantization off, so they compute
in float and every checkpoint of the search has the same keys; a level that takes the model to 8 bits calibrates
their ranges on the calibration batches and switches fake quantization on, and recovery trains with it on (QAT).
A rejected level goes back with the model's state (the switches are buffers); at the end of fit, a model that never
kept 8 bits gets its plain float layers back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from lightning_compress.batches import ModelInputs
from lightning_compress.quantization.calibration import calibrate
from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.layers import (
    QuantizedLayer,
    dequantize_layer,
    quantize_layer,
    quantizers,
    set_quantization,
)

#: The method's name in ``AutoCompression(methods=...)``.
INT8_METHOD = "int8"
#: The ``int8`` method's quantizers: int8 weights per output channel (7 bits, exact in the uint8 x int8 kernels of
#: every x86 CPU with AVX2, as the main job's ``int8_qat`` recipe) and int8 activations, ranges by min-max.
INT8 = QuantConfig(observer="minmax", averaging_constant=None)
#: The layer types the ``int8`` method quantizes (the others of a plan stay float).
INT8_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Int8Layers:
    """The targeted plain convolutions and linear layers of ``model`` as quantized layers (:data:`INT8`) that compute
    in float until :meth:`switch_on`.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(16, 4)
        >>> before = model(x)
        >>> layers = Int8Layers(model, {"0": model[0], "2": model[2]})
        >>> torch.equal(model(x), before), layers.on
        (True, False)
        >>> layers.switch_on([x])
        >>> layers.on, torch.equal(model(x), before)
        (True, False)
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        quantized = sorted(name for name, m in model.named_modules() if isinstance(m, QuantizedLayer))
        if quantized:
            raise ValueError(
                f"AutoCompression's int8 method quantizes the model itself, which already has quantized layers "
                f"({', '.join(quantized)}: QuantizationAwareTraining?): leave out that callback, or give "
                "methods=['channels']"
            )
        self.model = model
        self.layers = {name: quantize_layer(m, INT8) for name, m in layers.items() if type(m) in INT8_TYPES}
        if not self.layers:
            raise ValueError(
                f"AutoCompression's int8 method has no layer to quantize among {', '.join(layers) or 'none'}: it "
                f"quantizes {', '.join(t.__name__ for t in INT8_TYPES)}"
            )
        for layer in self.layers.values():
            set_quantization(layer, enabled=False, observing=False)

    @property
    def on(self) -> bool:
        """Whether fake quantization is on (the model computes on the integer grid)."""
        return any(bool(quantizer.enabled) for quantizer in quantizers(self.model))

    def switch_on(self, batches: Sequence[ModelInputs]) -> None:
        """Observe every quantized layer's ranges on ``batches``, freeze them and switch fake quantization on."""
        calibrate(self.model, [(inputs,) for inputs in batches])  # each batch of inputs as a batch's first item

    def to_float(self) -> None:
        """The plain float layers back (the model never kept 8 bits)."""
        for layer in self.layers.values():
            dequantize_layer(layer)
