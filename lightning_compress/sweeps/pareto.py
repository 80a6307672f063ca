"""The Pareto plot of a sweep: validation accuracy against deployed bytes and against latency, one point per job,
with the test accuracy of the jobs on the front beside theirs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from lightning_compress.analysis.plots import new_figure

#: Each panel's x-axis label and the scale from the summary's unit (bytes, ms) to the axis'.
AXES = {"bytes": ("deployed size (KiB)", 1 / 1024), "latency": ("latency, smallest batch (ms)", 1.0)}


class ParetoPoint(NamedTuple):
    """One job in one panel: its cost (bytes or milliseconds), validation accuracy (a fraction, what the front
    chooses by), test accuracy (``None`` without a test), folder name, and whether it is on that panel's Pareto front."""

    cost: float
    accuracy: float
    test_accuracy: float | None
    label: str
    on_front: bool


def plot_pareto(
    panels: dict[str, list[ParetoPoint]], path: str | os.PathLike[str], optimized: Sequence[str] = ()
) -> None:
    """One panel per axis of ``panels`` (``"bytes"``, ``"latency"``; smaller is better), validation accuracy up; the
    front is joined, and the test accuracy of each job on it is drawn beside it (reported, never used to choose).

    Each point is labelled with its job folder, the key to the summary table's rows; the title names the
    ``optimized`` metrics of the search (each ``"val_accuracy, deployed_bytes"``), if any.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "pareto.png"
        >>> plot_pareto({"bytes": [ParetoPoint(2048, 0.9, 0.88, "0", True)], "latency": []}, path, ["val_accuracy, deployed_bytes"])
        >>> path.read_bytes()[:4]
        b'\\x89PNG'
    """
    figure, axes = new_figure((12, 4.5), ncols=len(panels))
    for panel, (axis, points) in zip(axes, panels.items()):
        label, scale = AXES[axis]
        xs, ys = [point.cost * scale for point in points], [100 * point.accuracy for point in points]
        panel.scatter(xs, ys, color="tab:blue", label="job (validation accuracy)")
        front = sorted((x, y) for x, y, point in zip(xs, ys, points) if point.on_front)
        if front:
            panel.step(
                [x for x, _ in front], [y for _, y in front], where="post", color="tab:red", label="Pareto front"
            )
        tested = [
            (x, 100 * point.test_accuracy, point.label)
            for x, point in zip(xs, points)
            if point.on_front and point.test_accuracy is not None
        ]
        if tested:
            panel.scatter(
                [x for x, _, _ in tested],
                [y for _, y, _ in tested],
                marker="x",
                color="tab:green",
                label="test accuracy of a front job",
            )
        for x, y, name in [*zip(xs, ys, (point.label for point in points)), *tested]:
            panel.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        panel.set_xlabel(label)
        panel.set_ylabel("accuracy (%)")
        panel.set_title(f"Validation accuracy against {axis}")
        panel.grid(alpha=0.3)
        if points:
            panel.legend(loc="best")
    figure.suptitle(
        "Fronts chosen by validation accuracy" + "".join(f"; optimized: {metrics}" for metrics in optimized)
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
