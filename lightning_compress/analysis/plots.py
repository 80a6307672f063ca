"""Figures of the compression report, drawn off-screen on matplotlib ``Figure`` objects.

No pyplot: drawing a report neither switches the process's matplotlib backend nor opens a figure a
user's pyplot session would see, and importing this module does not import matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_compress.analysis.profile import ModelProfile
    from lightning_compress.analysis.report import Report


def new_figure(figsize: tuple[float, float], **subplots: Any) -> tuple[Figure, Any]:
    """A figure of ``figsize`` inches and its axes (``Figure.subplots(**subplots)``), for ``figure.savefig``.

    Example:
        >>> figure, axes = new_figure((4, 3), ncols=2)
        >>> len(axes), figure.get_size_inches().tolist()
        (2, [4.0, 3.0])
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(**subplots)


def plot_report(report: Report, path: str | os.PathLike[str]) -> None:
    """Three panels: each stage's size and speed relative to the first stage (the bytes of the state dict,
    of the deployed ONNX file and of the compressed file, the last against the first stage's state dict),
    its accuracy, and the last stage's per-layer weight sparsity.

    A latency measured in another runtime than the first stage's has no ratio and no bar.

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
    figure, (relative_axes, accuracy_axes, sparsity_axes) = new_figure(
        (16, 5.6), ncols=3, gridspec_kw={"width_ratios": [3, 1.2, 1.6]}
    )
    metrics = _relative_metrics(report)
    width = 0.8 / len(report.entries)
    for index, entry in enumerate(report.entries):
        ratios = [_ratio(get(entry.profile), divisor) for get, divisor in metrics.values()]
        positions = [m + index * width for m in range(len(metrics))]
        relative_axes.bar(positions, ratios, width=width, label=entry.name)
    relative_axes.set_xticks(
        [m + width * (len(report.entries) - 1) / 2 for m in range(len(metrics))], list(metrics), rotation=25, ha="right"
    )
    relative_axes.axhline(1.0, color="grey", linewidth=0.8)
    relative_axes.set_ylabel(f"ratio to '{report.entries[0].name}'")
    relative_axes.set_title("Size and speed relative to the first stage (lower is better)")
    # below the panel, where no bar is
    relative_axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(report.entries))

    names = [entry.name for entry in report.entries]
    for offset, (label, values) in enumerate(
        (("val", [e.val_accuracy for e in report.entries]), ("test", [e.test_accuracy for e in report.entries]))
    ):
        accuracy_axes.barh(
            [i + 0.4 * offset for i in range(len(names))],
            [100 * v if v is not None else float("nan") for v in values],
            height=0.4,
            label=label,
        )
    known = [100 * v for e in report.entries for v in (e.val_accuracy, e.test_accuracy) if v is not None]
    accuracy_axes.set_yticks([i + 0.2 for i in range(len(names))], names, fontsize="small")
    accuracy_axes.invert_yaxis()
    if known:
        accuracy_axes.set_xlim(max(0.0, min(known) - 5.0), 100.0)
    accuracy_axes.set_xlabel("accuracy (%)")
    accuracy_axes.set_title("Accuracy")
    accuracy_axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)

    last = report.entries[-1]
    layers = list(last.profile.layer_sparsity)
    sparsity_axes.barh(layers, [100 * last.profile.layer_sparsity[n].sparsity for n in layers])
    sparsity_axes.invert_yaxis()
    sparsity_axes.set_xlim(0, 100)
    sparsity_axes.set_xlabel("zero weights (%)")
    sparsity_axes.set_title(f"Zero weights per layer, '{last.name}'", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")


Metric = tuple[Callable[["ModelProfile"], float | None], float | None]


def _relative_metrics(report: Report) -> dict[str, Metric]:
    """The plotted metrics, each as (the value of a stage, the first stage's value it is divided by): counts,
    the bytes of every artifact the report measured (the compressed file against the first stage's state
    dict), MACs, and each latency (``None`` where a stage lacks it, or was timed in another runtime than the
    first stage)."""
    reference = report.entries[0].profile
    measured = {
        field: any(getattr(entry.profile, field) is not None for entry in report.entries)
        for field in ("onnx_bytes", "compressed_bytes")
    }
    metrics: dict[str, Metric] = {
        "parameters": (lambda p: p.parameters, reference.parameters),
        "non-zeros": (lambda p: p.nonzero_parameters, reference.nonzero_parameters),
        "state dict bytes": (lambda p: p.size_bytes, reference.size_bytes),
    }
    if measured["onnx_bytes"]:
        metrics["ONNX bytes"] = (lambda p: p.onnx_bytes, reference.onnx_bytes)
    if measured["compressed_bytes"]:
        metrics["compressed bytes"] = (lambda p: p.compressed_bytes, reference.size_bytes)
    metrics["MACs"] = (lambda p: p.macs, reference.macs)
    for batch in report.latency_batch_sizes():
        runtime = reference.latency[batch].runtime if batch in reference.latency else None

        def latency(p: ModelProfile, batch: int = batch, runtime: str | None = runtime) -> float | None:
            result = p.latency.get(batch)
            return result.median_ms if result is not None and result.runtime == runtime else None

        metrics[f"latency b{batch}"] = (latency, latency(reference))
    return metrics


def _ratio(value: float | None, reference: float | None) -> float:
    return value / reference if value is not None and reference else float("nan")
