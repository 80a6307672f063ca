"""Figures of the compression report, drawn with matplotlib's non-interactive backend."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from lightning_compress.analysis.report import Report


def plot_report(report: Report, path: str | os.PathLike[str]) -> None:
    """Two panels: each stage's size metrics relative to the first stage, and the per-layer weight sparsity.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from lightning_compress.analysis import Report, profile_model
        >>> report = Report()
        >>> report.add("before", profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=()))
        >>> path = Path(tempfile.mkdtemp()) / "report.png"
        >>> plot_report(report, path)
        >>> path.read_bytes()[:4]
        b'\x89PNG'
    """
    figure, (relative_axes, sparsity_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    reference = report.entries[0].profile
    metrics = {
        "parameters": lambda p: p.parameters,
        "non-zeros": lambda p: p.nonzero_parameters,
        "bytes": lambda p: p.size_bytes,
        "MACs": lambda p: p.macs,
    }
    for batch in report.latency_batch_sizes():
        metrics[f"latency b{batch}"] = lambda p, batch=batch: p.latency[batch].median_ms if batch in p.latency else float("nan")
    width = 0.8 / len(report.entries)
    for index, entry in enumerate(report.entries):
        ratios = [get(entry.profile) / get(reference) if get(reference) else float("nan") for get in metrics.values()]
        positions = [m + index * width for m in range(len(metrics))]
        relative_axes.bar(positions, ratios, width=width, label=entry.name)
    relative_axes.set_xticks([m + width * (len(report.entries) - 1) / 2 for m in range(len(metrics))], list(metrics), rotation=20)
    relative_axes.axhline(1.0, color="grey", linewidth=0.8)
    relative_axes.set_ylabel(f"ratio to '{report.entries[0].name}'")
    relative_axes.set_title("Size and speed relative to the first stage")
    relative_axes.legend()

    last = report.entries[-1]
    names = list(last.profile.layer_sparsity)
    sparsity_axes.barh(names, [100 * last.profile.layer_sparsity[n].sparsity for n in names])
    sparsity_axes.invert_yaxis()
    sparsity_axes.set_xlim(0, 100)
    sparsity_axes.set_xlabel("zero weights (%)")
    sparsity_axes.set_title(f"Per-layer weight sparsity, '{last.name}'")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
