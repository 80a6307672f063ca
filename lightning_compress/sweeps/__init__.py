"""Sweeps: one table and one Pareto plot from the jobs of a Hydra sweep, the Hydra callback that writes them, and
the checked objectives a search optimizes."""

from lightning_compress.sweeps.commands import SummarizeSweep
from lightning_compress.sweeps.objectives import CheckOptimizedMetrics, check_optimized_metrics
from lightning_compress.sweeps.summary import (
    METRICS,
    JobResult,
    check_metrics,
    collect,
    stage_metrics,
    write_summary,
)

__all__ = [
    "METRICS",
    "CheckOptimizedMetrics",
    "JobResult",
    "SummarizeSweep",
    "check_metrics",
    "check_optimized_metrics",
    "collect",
    "stage_metrics",
    "write_summary",
]
