"""Deployment: artifacts exported out of PyTorch (ONNX with integer layers, fake-quant state dicts, compressed state dicts) and the runtimes that run them."""

from lightning_compress.deploy.compressed import compressed_bytes, load_compressed
from lightning_compress.deploy.export import (
    EXPORT_FORMATS,
    FILE_SUFFIXES,
    check_export_format,
    export,
    load_quantized,
)
from lightning_compress.deploy.half import HALF_DTYPES, half_precision
from lightning_compress.deploy.onnx import OnnxRuntimeModel, onnx_bytes

__all__ = [
    "EXPORT_FORMATS",
    "FILE_SUFFIXES",
    "HALF_DTYPES",
    "OnnxRuntimeModel",
    "check_export_format",
    "compressed_bytes",
    "export",
    "half_precision",
    "load_compressed",
    "load_quantized",
    "onnx_bytes",
]
