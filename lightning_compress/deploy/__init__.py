"""Deployment runtimes: models exported out of PyTorch and run there."""

from lightning_compress.deploy.onnx import OnnxRuntimeModel, onnx_bytes

__all__ = ["OnnxRuntimeModel", "onnx_bytes"]
