"""Lightning callbacks that are not a compression method of their own."""

from lightning_compress.callbacks.report import CompressionReport

__all__ = ["CompressionReport"]
