"""Sweeps: one table and one Pareto plot from the jobs of a Hydra sweep, and the Hydra callback that writes them."""

from lightning_compress.sweeps.commands import SummarizeSweep
from lightning_compress.sweeps.summary import (
    METRICS,
    JobResult,
    check_metrics,
    collect,
    stage_metrics,
    write_summary,
)

__all__ = ["METRICS", "JobResult", "SummarizeSweep", "check_metrics", "collect", "stage_metrics", "write_summary"]
