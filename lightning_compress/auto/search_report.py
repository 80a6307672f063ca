"""What an :class:`~lightning_compress.AutoCompression` search did, for people: its levels and its plan as Markdown
tables, and a picture of the objective against the validation metric of each level with the budget line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_compress.analysis.plots import new_figure
from lightning_compress.auto.objectives import UNITS
from lightning_compress.files import write_atomically

if TYPE_CHECKING:
    from lightning_compress.auto.callback import AutoCompression


def search_summary(auto: AutoCompression) -> str:
    """One line: the budget, the reference, and the accepted level's validation drop and predicted ratio."""
    accepted = [level for level in auto.history if level.accepted]
    reached = (
        f"level {accepted[-1].level} kept: {auto.monitor} {accepted[-1].metric:.4g} (drop {accepted[-1].drop:.4g}), "
        f"{accepted[-1].measured_cost:,} {UNITS[auto.objective]} ({auto.accepted_ratio:.1f}x fewer predicted)"
        if accepted
        else "no level within the budget: the dense model is kept"
    )
    return (
        f"AutoCompression ({auto.objective}): budget {auto.max_accuracy_drop:g} of {auto.monitor} from the dense "
        f"model's {auto.reference:.4g}; {len(auto.history)} levels tried, {reached}"
    )


def search_markdown(auto: AutoCompression) -> str:
    """The summary, a table of the levels tried and a table of the accepted plan."""
    unit = UNITS[auto.objective]
    lines = [
        search_summary(auto),
        "",
        f"| level | method | first epoch | ratio (predicted) | {unit} (predicted) | {unit} (measured) | {auto.monitor} | "
        "drop | margin | allowed drop | kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {level.level} | {level.method} | {level.epoch} | {level.ratio:.1f}x | {level.predicted_cost:,} | "
        f"{level.measured_cost:,} | {level.metric:.4g} | {level.drop:.4g} | {level.margin:.4g} | {level.allowed_drop:.4g} | {'yes' if level.accepted else 'no'} |"
        for level in auto.history
    ]
    lines += [
        "",
        f"| layer | weights pruned | channels pruned | shared values | {unit} (predicted) | {unit} (in the model) | "
        "damage at its level (KL) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {layer} | {plan.sparsity:.0%} | {plan.channels:.1%} | "
        f"{'float' if plan.bits is None else f'{2**plan.bits} ({plan.bits} bits)'} | {plan.predicted_cost:,} | "
        f"{plan.cost:,} | {plan.damage:.3g} |"
        for layer, plan in auto.plan.items()
    ]
    return "\n".join(lines) + "\n"


def plot_search(auto: AutoCompression, path: str | os.PathLike[str]) -> None:
    """The measured objective (the compressed file's bytes, or the MACs) against the monitored metric for each level tried, the dense model's metric and
    the budget as lines, the kept level circled."""
    figure, axes = new_figure((7, 4.5))
    for accepted, marker, color, label in ((True, "o", "tab:green", "within budget"), (False, "x", "tab:red", "over")):
        levels = [level for level in auto.history if level.accepted == accepted]
        axes.scatter(
            [level.measured_cost for level in levels],
            [level.metric for level in levels],
            marker=marker,
            color=color,
            label=label,
        )
        for level in levels:
            axes.annotate(str(level.level), (level.measured_cost, level.metric), fontsize=8)
    sign = -1 if auto.mode == "max" else 1
    axes.axhline(auto.reference, color="grey", linestyle="--", label=f"dense {auto.monitor}")
    axes.axhline(auto.reference + sign * auto.max_accuracy_drop, color="black", linestyle=":", label="budget")
    kept = [level for level in auto.history if level.accepted]
    if kept:
        axes.scatter(
            [kept[-1].measured_cost],
            [kept[-1].metric],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="kept",
        )
    axes.set_xscale("log")
    axes.set_xlabel(f"{UNITS[auto.objective]} (log scale)")
    axes.set_ylabel(auto.monitor)
    axes.set_title("AutoCompression: each level tried")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")


def write_search(auto: AutoCompression, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``auto_compression.md`` and ``auto_compression.png`` into ``directory``, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": directory / "auto_compression.md", "plot": directory / "auto_compression.png"}
    write_atomically(paths["markdown"], lambda path: path.write_text(search_markdown(auto)))
    write_atomically(paths["plot"], lambda path: plot_search(auto, path))
    return paths
