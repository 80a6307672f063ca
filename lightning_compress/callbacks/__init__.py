"""Lightning callbacks that are not a compression method of their own."""

from lightning_compress.callbacks.checkpoint import CompressionCheckpoint, CompressionStage
from lightning_compress.callbacks.finite import FiniteCheck
from lightning_compress.callbacks.report import CompressionReport

__all__ = ["CompressionCheckpoint", "CompressionReport", "CompressionStage", "FiniteCheck"]
