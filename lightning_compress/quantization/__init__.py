"""Quantization: observers, fake quantizers and quantized layers (plain PyTorch) and the Lightning callbacks."""

from lightning_compress.quantization.callback import QuantizationAwareTraining
from lightning_compress.quantization.config import OBSERVERS, QuantConfig
from lightning_compress.quantization.fake_quant import FakeQuantizer
from lightning_compress.quantization.layers import (
    QUANTIZED_TYPES,
    QuantizedLayer,
    quantize_model,
    quantized_layers,
    set_quantization,
)
from lightning_compress.quantization.observers import Observer

__all__ = [
    "OBSERVERS",
    "QUANTIZED_TYPES",
    "FakeQuantizer",
    "Observer",
    "QuantConfig",
    "QuantizationAwareTraining",
    "QuantizedLayer",
    "quantize_model",
    "quantized_layers",
    "set_quantization",
]
