"""Measurement in plain PyTorch: size, sparsity, MACs, latency, accuracy, pruning sensitivity, and the report built from them."""

from lightning_compress.analysis.latency import (
    LATENCY_RUNTIMES,
    LatencyResult,
    check_latency_options,
    measure_latencies,
    measure_latency,
)
from lightning_compress.analysis.measure import (
    SparsityStats,
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    global_sparsity,
    layer_sparsity,
    size_on_disk,
)
from lightning_compress.analysis.profile import (
    Inputs,
    ModelProfile,
    TimedModel,
    evaluate_accuracy,
    example_batch,
    is_example_batch,
    profile_model,
    time_models,
)
from lightning_compress.analysis.report import Report, ReportEntry
from lightning_compress.analysis.sensitivity import SensitivityPoint, layer_amounts, sensitivity_analysis
from lightning_compress.modules import WEIGHT_LAYER_TYPES, eval_mode, weight_layers

__all__ = [
    "Inputs",
    "LATENCY_RUNTIMES",
    "WEIGHT_LAYER_TYPES",
    "LatencyResult",
    "ModelProfile",
    "Report",
    "ReportEntry",
    "SensitivityPoint",
    "SparsityStats",
    "TimedModel",
    "check_latency_options",
    "count_macs",
    "count_nonzero_parameters",
    "count_parameters",
    "eval_mode",
    "evaluate_accuracy",
    "example_batch",
    "global_sparsity",
    "is_example_batch",
    "layer_amounts",
    "layer_sparsity",
    "measure_latencies",
    "measure_latency",
    "profile_model",
    "sensitivity_analysis",
    "size_on_disk",
    "time_models",
    "weight_layers",
]
