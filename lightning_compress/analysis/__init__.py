"""Measurement in plain PyTorch: size, sparsity, MACs, latency, accuracy, and the report built from them."""

from lightning_compress.analysis.latency import (
    LATENCY_RUNTIMES,
    LatencyResult,
    check_latency_options,
    measure_latencies,
    measure_latency,
)
from lightning_compress.analysis.measure import (
    WEIGHT_LAYER_TYPES,
    SparsityStats,
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    eval_mode,
    global_sparsity,
    layer_sparsity,
    size_on_disk,
    weight_layers,
)
from lightning_compress.analysis.profile import ModelProfile, TimedModel, evaluate_accuracy, profile_model, time_models
from lightning_compress.analysis.report import Report, ReportEntry

__all__ = [
    "LATENCY_RUNTIMES",
    "WEIGHT_LAYER_TYPES",
    "LatencyResult",
    "ModelProfile",
    "Report",
    "ReportEntry",
    "SparsityStats",
    "TimedModel",
    "check_latency_options",
    "count_macs",
    "count_nonzero_parameters",
    "count_parameters",
    "eval_mode",
    "evaluate_accuracy",
    "global_sparsity",
    "layer_sparsity",
    "measure_latencies",
    "measure_latency",
    "profile_model",
    "size_on_disk",
    "time_models",
    "weight_layers",
]
