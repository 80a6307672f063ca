"""The Pareto plot of a sweep: accuracy against deployed bytes and against latency, one point per job."""

from __future__ import annotations

import os
from typing import NamedTuple

from lightning_compress.analysis.plots import new_figure

#: Each panel's x-axis label and the scale from the summary's unit (bytes, ms) to the axis'.
AXES = {"bytes": ("deployed size (KiB)", 1 / 1024), "latency": ("latency, smallest batch (ms)", 1.0)}


class ParetoPoint(NamedTuple):
    """One job in one panel: its cost (bytes or milliseconds), accuracy (a fraction), folder name, and
    whether it is on that panel's Pareto front."""

    cost: float
    accuracy: float
    label: str
    on_front: bool


def plot_pareto(panels: dict[str, list[ParetoPoint]], path: str | os.PathLike[str]) -> None:
    """One panel per axis of ``panels`` (``"bytes"``, ``"latency"``; smaller is better), accuracy up; the front is joined.

    Each point is labelled with its job folder, the key to the summary table's rows.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "pareto.png"
        >>> plot_pareto({"bytes": [ParetoPoint(2048, 0.9, "0", True)], "latency": []}, path)
        >>> path.read_bytes()[:4]
        b'\\x89PNG'
    """
    figure, axes = new_figure((12, 4.5), ncols=len(panels))
    for panel, (axis, points) in zip(axes, panels.items()):
        label, scale = AXES[axis]
        xs, ys = [point.cost * scale for point in points], [100 * point.accuracy for point in points]
        panel.scatter(xs, ys, color="tab:blue", label="job")
        front = sorted((x, y) for x, y, point in zip(xs, ys, points) if point.on_front)
        if front:
            panel.step(
                [x for x, _ in front], [y for _, y in front], where="post", color="tab:red", label="Pareto front"
            )
        for x, y, point in zip(xs, ys, points):
            panel.annotate(point.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        panel.set_xlabel(label)
        panel.set_ylabel("accuracy (%)")
        panel.set_title(f"Accuracy against {axis}")
        panel.grid(alpha=0.3)
        if points:
            panel.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
