"""Deployment: artifacts exported out of PyTorch (ONNX with integer layers, fake-quant state dicts) and the runtimes that run them."""

from lightning_compress.deploy.export import (
    EXPORT_FORMATS,
    check_export_format,
    export,
    load_quantized,
)
from lightning_compress.deploy.half import HALF_DTYPES, half_precision
from lightning_compress.deploy.onnx import OnnxRuntimeModel, onnx_bytes

__all__ = [
    "EXPORT_FORMATS",
    "HALF_DTYPES",
    "OnnxRuntimeModel",
    "check_export_format",
    "export",
    "half_precision",
    "load_quantized",
    "onnx_bytes",
]
