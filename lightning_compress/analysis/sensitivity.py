"""Per-layer pruning sensitivity, as in Intel Distiller: accuracy as each layer alone is pruned to several levels.

Each point prunes one layer's weights by magnitude (``|w|``, within the layer) to one level, measures
accuracy and puts the weights back. The points are written to a CSV as they are measured; a second call
with the same file measures only the points that are missing, so a long analysis can be interrupted and
resumed. :func:`layer_amounts` turns the CSV into per-layer amounts for ``Pruning(amount={...})``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from lightning_compress.analysis.plots import new_figure
from lightning_compress.analysis.profile import evaluate_accuracy
from lightning_compress.files import write_atomically
from lightning_compress.pruning.criteria import element_scores
from lightning_compress.pruning.masks import rank_masks
from lightning_compress.targets import TargetSpec, select_layers

#: The row of the CSV that holds the unpruned model's accuracy.
DENSE = "(dense)"
FIELDS = ("layer", "sparsity", "accuracy")


@dataclass(frozen=True)
class SensitivityPoint:
    """The accuracy with one layer (``DENSE`` for none) pruned to ``sparsity``.

    Example:
        >>> SensitivityPoint("model.features.4", 0.5, 0.91)
        SensitivityPoint(layer='model.features.4', sparsity=0.5, accuracy=0.91)
    """

    layer: str
    sparsity: float
    accuracy: float


def sensitivity_analysis(
    model: nn.Module,
    batches: Sequence[Sequence[torch.Tensor]],
    levels: Sequence[float],
    csv_path: str | os.PathLike[str],
    targets: TargetSpec = None,
    exclude: TargetSpec = None,
    progress: bool = True,
) -> list[SensitivityPoint]:
    """Measure the accuracy over ``batches`` with each targeted layer alone pruned to each of ``levels``.

    Points already in ``csv_path`` are read back, not measured again; each new point is added to the
    file (rewritten atomically) as soon as it is measured, and at the end the file holds exactly this
    analysis's points. The model's weights are unchanged afterwards.
    ``progress`` shows a progress bar over the points.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> path = Path(tempfile.mkdtemp()) / "sensitivity.csv"
        >>> points = sensitivity_analysis(model, batches, [0.5, 0.9], path, progress=False)
        >>> [(p.layer, p.sparsity) for p in points]
        [('(dense)', 0.0), ('0', 0.5), ('0', 0.9), ('2', 0.5), ('2', 0.9)]
    """
    levels = sorted(float(level) for level in levels)
    if not levels or not all(0.0 < level < 1.0 for level in levels):
        raise ValueError(f"levels must be sparsities in (0, 1), got {list(levels)}")
    csv_path = Path(csv_path)
    layers = select_layers(model, targets, exclude)
    todo = [(DENSE, 0.0)] + [(name, level) for name in layers for level in levels]
    done = {(point.layer, point.sparsity): point for point in read_points(csv_path)} if csv_path.is_file() else {}
    points = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("pruning sensitivity", total=len(todo), completed=sum(key in done for key in todo))
        for layer, level in todo:
            if (layer, level) not in done:
                done[(layer, level)] = SensitivityPoint(
                    layer, level, _accuracy_with_pruned(model, batches, layers.get(layer), level)
                )
                write_points(csv_path, [done[key] for key in todo if key in done])
                bar.advance(task)
            points.append(done[(layer, level)])
    write_points(csv_path, points)  # this analysis's points only, whatever else an older file held
    return points


@torch.no_grad()
def _accuracy_with_pruned(
    model: nn.Module, batches: Iterable[Sequence[torch.Tensor]], layer: nn.Module | None, level: float
) -> float:
    if layer is None:
        return evaluate_accuracy(model, batches)
    original = layer.weight.detach().clone()
    scores = {"weight": element_scores(original, "magnitude")}
    mask = rank_masks(scores, level, scope="layer", keep_rows=False)["weight"]  # the layer alone, any row
    layer.weight.mul_(mask)
    try:
        return evaluate_accuracy(model, batches)
    finally:
        layer.weight.copy_(original)


def read_points(path: str | os.PathLike[str]) -> list[SensitivityPoint]:
    """The points of a sensitivity CSV."""
    with Path(path).open(newline="") as handle:
        return [
            SensitivityPoint(row["layer"], float(row["sparsity"]), float(row["accuracy"]))
            for row in csv.DictReader(handle)
        ]


def write_points(path: Path, points: Iterable[SensitivityPoint]) -> None:
    """Write the points as a CSV (``layer,sparsity,accuracy``), atomically."""

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(FIELDS)
            writer.writerows((point.layer, point.sparsity, point.accuracy) for point in points)

    write_atomically(path, write)


def layer_amounts(path: str | os.PathLike[str], max_accuracy_drop: float = 0.01) -> dict[str, float]:
    """Per-layer amounts from a sensitivity CSV: for each layer, the highest level at which it and every
    lower level lose at most ``max_accuracy_drop`` of accuracy against the dense row (absolute: 0.01 is
    one point).
    Layers too sensitive for the lowest level are left out. Ready for ``Pruning(amount=...)``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "sensitivity.csv"
        >>> write_points(path, [SensitivityPoint(*p) for p in [("(dense)", 0, 0.9), ("a", 0.5, 0.9), ("a", 0.9, 0.7), ("b", 0.5, 0.5)]])
        >>> layer_amounts(path, max_accuracy_drop=0.01)
        {'a': 0.5}
    """
    points = read_points(path)
    dense = next((point.accuracy for point in points if point.layer == DENSE), None)
    if dense is None:
        raise ValueError(f"{str(path)!r} has no {DENSE} row, the accuracy the drops are measured from")
    amounts: dict[str, float] = {}
    for point in sorted((p for p in points if p.layer != DENSE), key=lambda p: (p.layer, p.sparsity)):
        within = dense - point.accuracy <= max_accuracy_drop + 1e-12
        if within and amounts.get(point.layer, 0.0) == _previous_level(points, point):
            amounts[point.layer] = point.sparsity
    return {layer: amount for layer, amount in amounts.items() if amount > 0.0}


def _previous_level(points: list[SensitivityPoint], point: SensitivityPoint) -> float:
    """The level just below ``point``'s in its layer (0.0 for the lowest)."""
    return max((p.sparsity for p in points if p.layer == point.layer and p.sparsity < point.sparsity), default=0.0)


def plot_sensitivity(points: Sequence[SensitivityPoint], path: str | os.PathLike[str]) -> None:
    """Accuracy against sparsity, one line per layer, the dense accuracy as a dashed line."""
    figure, axes = new_figure((8, 5))
    dense = next((point.accuracy for point in points if point.layer == DENSE), None)
    for layer in dict.fromkeys(point.layer for point in points if point.layer != DENSE):
        curve = sorted((p.sparsity, p.accuracy) for p in points if p.layer == layer)
        axes.plot([100 * s for s, _ in curve], [100 * a for _, a in curve], marker="o", label=layer)
    if dense is not None:
        axes.axhline(100 * dense, color="grey", linestyle="--", label="dense")
    axes.set_xlabel("sparsity of the layer (%)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Pruning sensitivity: each layer pruned alone (magnitude)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
