"""The Pareto plot of a sweep: accuracy against deployed bytes and against latency, one point per job."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lightning_compress.analysis.plots import new_figure

if TYPE_CHECKING:
    from lightning_compress.sweeps.summary import JobResult


def plot_pareto(jobs: list[JobResult], path: str | os.PathLike[str]) -> None:
    """Two panels, bytes and latency on the x-axes (smaller is better), accuracy up; the front is joined.

    Each point is labelled with its job folder, the key to the summary table's rows.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "pareto.png"
        >>> plot_pareto([], path)
        >>> path.read_bytes()[:4]
        b'\\x89PNG'
    """
    from lightning_compress.sweeps.summary import METRICS, PARETO_AXES

    figure, axes = new_figure((12, 4.5), ncols=len(PARETO_AXES))
    labels = {"bytes": "deployed size (KiB)", "latency": "latency, smallest batch (ms)"}
    scale = {"bytes": 1 / 1024, "latency": 1.0}
    for panel, (axis, metric) in zip(axes, PARETO_AXES.items()):
        points = []
        for job in jobs:
            if job.report is None or not job.report.entries:
                continue
            x = METRICS[metric](job.report.entries[-1])
            if job.accuracy is not None and x is not None:
                points.append((x * scale[axis], 100 * job.accuracy, job.folder.name, job.pareto.get(axis, False)))
        panel.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", label="job")
        front = sorted((p for p in points if p[3]), key=lambda p: p[0])
        if front:
            panel.step(
                [p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", label="Pareto front"
            )
        for x, y, name, _ in points:
            panel.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        panel.set_xlabel(labels[axis])
        panel.set_ylabel("accuracy (%)")
        panel.set_title(f"Accuracy against {axis}")
        panel.grid(alpha=0.3)
        if points:
            panel.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
