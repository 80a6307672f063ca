"""lightning-compress: model compression for PyTorch Lightning, measured."""

from lightning_compress.analysis import Report, profile_model
from lightning_compress.auto import AutoCompression, allocate_bits
from lightning_compress.callbacks import CompressionCheckpoint, CompressionReport, FiniteCheck
from lightning_compress.clustering import WeightClustering
from lightning_compress.deploy import compressed_bytes, export, half_precision, load_compressed, load_quantized
from lightning_compress.distillation import DistillationModule
from lightning_compress.models import ClassificationModule
from lightning_compress.oneshot import OneShotPruning, OneShotQuantization
from lightning_compress.pruning import Pruner, Pruning, PruningConfig, prune_
from lightning_compress.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
)

__all__ = [
    "AutoCompression",
    "ClassificationModule",
    "CompressionCheckpoint",
    "CompressionReport",
    "DistillationModule",
    "FiniteCheck",
    "OneShotPruning",
    "OneShotQuantization",
    "PostTrainingQuantization",
    "Pruner",
    "Pruning",
    "PruningConfig",
    "QuantizationAwareTraining",
    "Report",
    "WeightClustering",
    "allocate_bits",
    "compressed_bytes",
    "export",
    "half_precision",
    "load_compressed",
    "load_quantized",
    "profile_model",
    "prune_",
]
__version__ = "0.1.0"
