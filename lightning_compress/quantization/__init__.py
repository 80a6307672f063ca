"""Quantization: observers, fake quantizers and quantized layers (plain PyTorch) and the Lightning callbacks."""

from lightning_compress.quantization.calibration import calibrate
from lightning_compress.quantization.callback import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_compress.quantization.config import OBSERVERS, QuantConfig
from lightning_compress.quantization.fake_quant import FakeQuantizer
from lightning_compress.quantization.layers import (
    QUANTIZED_TYPES,
    QuantizedEmbedding,
    QuantizedLayer,
    dequantize_layer,
    quantize_layer,
    quantize_model,
    quantized_layers,
    quantizers,
    set_quantization,
)
from lightning_compress.quantization.observers import Observer

__all__ = [
    "OBSERVERS",
    "QUANTIZED_TYPES",
    "FakeQuantizer",
    "Observer",
    "PostTrainingQuantization",
    "QuantConfig",
    "QuantizationAwareTraining",
    "QuantizedEmbedding",
    "QuantizedLayer",
    "calibrate",
    "dequantize_layer",
    "quantize_layer",
    "quantize_model",
    "quantized_layers",
    "quantizers",
    "set_quantization",
]
