"""The compression report: one row per measured stage of a model, written as JSON, Markdown and a plot."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from lightning_compress.analysis.profile import ModelProfile
from lightning_compress.files import write_atomically

#: How the report names the runtime a stage's latency was measured in, where it is not the reference's.
RUNTIME_NAMES = {"torch": "eager PyTorch", "onnxruntime": "ONNX Runtime"}


@dataclass
class ReportEntry:
    """A named stage of a model (``"before"``, ``"after"``, ``"pruned"``...) with its accuracy and profile.

    Example:
        >>> import torch
        >>> from lightning_compress.analysis import profile_model
        >>> entry = ReportEntry("after", profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=()), val_accuracy=0.9)
        >>> entry.to_dict()["val_accuracy"], entry.to_dict()["parameters"]
        (0.9, 10)
    """

    name: str
    profile: ModelProfile
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    #: One line the report prints under its table about this stage (e.g. why it was timed in another runtime).
    note: str | None = None
    #: Integer layers whose 8-bit weights the ONNX export stores as uint8 (full 8-bit weights for
    #: ``target_cpu="avx2"``), which ONNX Runtime multiplies by uint8 inputs in its uint8 x uint8 kernels.
    uint8_weight_layers: int = 0
    #: The stage this one is a converted copy of (a half-precision model), never trained itself; ``None`` for a
    #: trained stage.
    derived_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "note": self.note,
            "uint8_weight_layers": self.uint8_weight_layers,
            "derived_from": self.derived_from,
            **self.profile.to_dict(),
        }


@dataclass
class Report:
    """Stages of one model measured side by side; the first entry is the reference for ratios.

    Example:
        >>> import torch
        >>> from lightning_compress.analysis import profile_model
        >>> report = Report(metadata={"model": "linear"})
        >>> report.add("before", profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=()))
        >>> [row["parameters"] for row in report.rows()]
        ['10']
    """

    entries: list[ReportEntry] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        name: str,
        profile: ModelProfile,
        val_accuracy: float | None = None,
        note: str | None = None,
        uint8_weight_layers: int = 0,
        derived_from: str | None = None,
    ) -> None:
        """Add a stage, replacing an earlier one of the same name."""
        self.entries = [entry for entry in self.entries if entry.name != name]
        self.entries.append(
            ReportEntry(
                name=name,
                profile=profile,
                val_accuracy=val_accuracy,
                note=note,
                uint8_weight_layers=uint8_weight_layers,
                derived_from=derived_from,
            )
        )

    def final_trained(self) -> ReportEntry:
        """The last stage that was trained (a sweep job's result), not a copy converted from another.

        Example:
            >>> import torch
            >>> from lightning_compress.analysis import profile_model
            >>> profile = profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=())
            >>> report = Report()
            >>> report.add("dense", profile)
            >>> report.add("dense bfloat16", profile, derived_from="dense")
            >>> report.final_trained().name
            'dense'
        """
        return next(entry for entry in reversed(self.entries) if entry.derived_from is None)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output, as stored in a checkpoint or ``report.json``."""
        entries = [
            ReportEntry(
                name=stage["name"],
                profile=ModelProfile.from_dict(stage),
                val_accuracy=stage["val_accuracy"],
                test_accuracy=stage["test_accuracy"],
                note=stage.get("note"),
                uint8_weight_layers=stage.get("uint8_weight_layers", 0),
                derived_from=stage.get("derived_from"),
            )
            for stage in data["stages"]
        ]
        return cls(entries=entries, metadata=dict(data["metadata"]))

    def entry(self, name: str) -> ReportEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"the report has no stage {name!r}; it has {[entry.name for entry in self.entries]}")

    def latency_batch_sizes(self) -> list[int]:
        return sorted({batch for entry in self.entries for batch in entry.profile.latency})

    def to_dict(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "stages": [entry.to_dict() for entry in self.entries]}

    def rows(self) -> list[dict[str, str]]:
        """Each stage as formatted cells; after the first stage, each size column carries its ratio to the first."""
        reference = self.entries[0].profile if self.entries else None
        rows = []
        for entry in self.entries:
            profile = entry.profile
            row = {
                "stage": entry.name,
                "val acc": _percent(entry.val_accuracy),
                "test acc": _percent(entry.test_accuracy),
                "parameters": _with_ratio(profile.parameters, reference.parameters, entry, self, "{:,}"),
                "non-zeros": _with_ratio(profile.nonzero_parameters, reference.nonzero_parameters, entry, self, "{:,}"),
                "weight sparsity": f"{100 * profile.weight_sparsity.sparsity:.1f}%",
                "size (KiB)": _with_ratio(
                    profile.size_bytes / 1024, reference.size_bytes / 1024, entry, self, "{:,.1f}"
                ),
                "MACs": _with_ratio(profile.macs, reference.macs, entry, self, "{:,}"),
            }
            if any(other.profile.onnx_bytes is not None for other in self.entries):
                row["ONNX size (KiB)"] = (
                    "–"
                    if profile.onnx_bytes is None
                    else _with_ratio(
                        profile.onnx_bytes / 1024, (reference.onnx_bytes or 0) / 1024 or None, entry, self, "{:,.1f}"
                    )
                )
            if any(other.profile.compressed_bytes is not None for other in self.entries):
                row["compressed (KiB)"] = _compressed_cell(profile, reference)
            for batch in self.latency_batch_sizes():
                here, there = profile.latency.get(batch), reference.latency.get(batch)
                if here is None:
                    cell = "–"
                elif (
                    there is not None and here.runtime != there.runtime
                ):  # timed elsewhere: no ratio, the runtime named
                    cell = f"{here.median_ms:.3f} ({RUNTIME_NAMES.get(here.runtime, here.runtime)})"
                else:
                    cell = _with_ratio(here.median_ms, there.median_ms if there else None, entry, self, "{:.3f}")
                row[f"latency b{batch} (ms)"] = cell
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        rows = self.rows()
        if not rows:
            return "_no stage measured_\n"
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row[column] for column in header) + " |" for row in rows]
        notes = ", ".join(f"{key}: {value}" for key, value in self.metadata.items())
        stage_notes = "".join(f"\n- {line}" for line in self.notes())
        return "\n".join(lines) + ("\n" + stage_notes if stage_notes else "") + ("\n\n" + notes if notes else "") + "\n"

    def notes(self) -> list[str]:
        """The stages' notes, one line each, as ``"<stage>: <note>"``: those given with the stage, and why a
        stage is slower than the first one where it is (:func:`slower_because`, for the CPU in ``metadata["cpu"]``,
        as :func:`~lightning_compress.analysis.cpu.cpu_flags` describes it)."""
        notes = [f"{entry.name}: {entry.note}" for entry in self.entries if entry.note]
        reference = self.entries[0].profile if self.entries else None
        for entry in self.entries[1:]:
            reason = slower_because(entry.profile, reference, self.metadata.get("cpu"), entry.uint8_weight_layers)
            if reason is not None:
                notes.append(f"{entry.name}: {reason}")
        return notes

    def to_rich_table(self) -> Table:
        """The same cells as :meth:`rows`, one column per stage so the table fits a terminal."""
        table = Table(title="Compression report", caption="\n".join(self.notes()) or None, caption_justify="left")
        rows = self.rows()
        table.add_column("metric", justify="left", no_wrap=True)
        for row in rows:
            table.add_column(row["stage"], justify="right", no_wrap=True)
        for metric in list(rows[0])[1:] if rows else []:
            table.add_row(metric, *(row[metric] for row in rows))
        return table

    def print(self) -> None:
        """Print :meth:`to_rich_table` at its full width, wider than the terminal if need be: a narrow terminal
        wraps the lines instead of cutting the ratios off the cells."""
        table = self.to_rich_table()
        console = Console()
        console.width = max(
            console.width, Measurement.get(console, console.options.update_width(10_000), table).maximum
        )
        console.print(table)

    def write(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory``, each atomically."""
        from lightning_compress.analysis.plots import plot_report

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": directory / "report.json",
            "markdown": directory / "report.md",
            "plot": directory / "report.png",
        }
        write_atomically(paths["json"], lambda path: path.write_text(json.dumps(self.to_dict(), indent=2) + "\n"))
        write_atomically(paths["markdown"], lambda path: path.write_text(self.to_markdown()))
        write_atomically(paths["plot"], lambda path: plot_report(self, path))
        return paths


# Why integer graphs were slower than float on a CPU with VNNI, as measured there: uint8 weights by
# benchmarks/quantization_vs_ort.py, the cost at batch 1 by ONNX Runtime's profiler (SmallCNN, 1 thread)
_MEASURED_ON_VNNI = {
    "uint8_weights": (
        "its full 8-bit weights are stored as uint8 for CPUs without VNNI (target_cpu='avx2' with reduce_range=False), "
        "and ONNX Runtime's uint8 x uint8 kernels are slow on this VNNI CPU (measured on SmallCNN: 1.4x-1.8x the time "
        "of int8 weights); 7-bit weights (the default) or target_cpu='vnni' run in its fast uint8 x int8 kernels"
    ),
    "batch_1": (
        "at batch 1 on a VNNI CPU, ONNX Runtime's profile of SmallCNN on 8x8 inputs (347,392 MACs) put the integer "
        "graph's extra time in quantizing the input and changing its layout for the integer kernels (a Transpose in, "
        "one out), which its integer arithmetic did not win back (quantize_static's graph was as slow)"
    ),
}


def slower_because(
    profile: ModelProfile,
    reference: ModelProfile,
    cpu: Mapping[str, Any] | None = None,
    uint8_weight_layers: int = 0,
) -> str | None:
    """Why ``profile`` is slower than ``reference`` at some batch size (timed in the same runtime), in one
    line, or ``None`` where it is not slower.

    In order: a stage whose fastest run is as fast as the first stage's median run is within the spread
    of repeated timings; a model with the same MACs and no integer layers computes what the first stage does,
    so the difference is timing noise; an integer model gets the cause measured on the kind of CPU it ran on
    (``cpu``, :func:`~lightning_compress.analysis.cpu.cpu_flags`: with or without VNNI), given its
    ``uint8_weight_layers`` (see :class:`ReportEntry`), or the note says the cause is not known.

    Example:
        >>> from lightning_compress.analysis.latency import LatencyResult
        >>> from lightning_compress.analysis.measure import SparsityStats
        >>> def profile(ms, low, high, quantized=0):
        ...     timing = LatencyResult(1, ms, low, high, 10, 2, 1, "cpu", "onnxruntime")
        ...     return ModelProfile(10, 10, SparsityStats(0, 8), {}, 100, 8, {1: timing}, quantized_layers=quantized)
        >>> slower_because(profile(0.03, 0.028, 0.035, quantized=2), profile(0.02, 0.019, 0.022), {"vnni": False})
        'slower than the first stage at batch 1 (1.50x): the cause is not known: it was not measured on a CPU without VNNI, like this one'
    """
    slower = {
        batch: (here, reference.latency[batch])
        for batch, here in profile.latency.items()
        if batch in reference.latency
        and here.runtime == reference.latency[batch].runtime
        and here.median_ms > reference.latency[batch].median_ms
    }
    if not slower:
        return None
    batch, (here, there) = max(slower.items(), key=lambda item: item[1][0].median_ms / item[1][1].median_ms)
    where = f"slower than the first stage at batch {batch} ({here.median_ms / there.median_ms:.2f}x)"
    if all(mine.min_ms <= theirs.median_ms for mine, theirs in slower.values()):
        return (
            f"{where}, within the spread of repeated timings (its fastest run is as fast as the first stage's median)"
        )
    if profile.quantized_layers == 0 and profile.macs >= reference.macs:
        return (
            f"{where}: it does the first stage's MACs (unstructured zeros are multiplied like any weight), so the "
            "difference is the machine's timing noise; prune channels (remove_channels=True) to cut MACs and time"
        )
    if profile.quantized_layers:
        return f"{where}: {_integer_cause(here.runtime, batch, cpu, uint8_weight_layers)}"
    return f"{where}"


def _integer_cause(runtime: str, batch: int, cpu: Mapping[str, Any] | None, uint8_weight_layers: int) -> str:
    """Why a fake-quantized model timed in ``runtime`` at ``batch`` was slower than float, as measured on ``cpu``'s kind."""
    if runtime != "onnxruntime":
        return (
            f"timed in {RUNTIME_NAMES.get(runtime, runtime)}, where fake quantization rounds in float on top of the "
            "float arithmetic; latency_runtime='onnxruntime' times the integer graph"
        )
    vnni = None if cpu is None else cpu.get("vnni")
    if vnni is None:
        return "the cause is not known: the report does not say whether this CPU has VNNI"
    if not vnni:
        return "the cause is not known: it was not measured on a CPU without VNNI, like this one"
    if uint8_weight_layers:
        return _MEASURED_ON_VNNI["uint8_weights"]
    if batch == 1:
        return _MEASURED_ON_VNNI["batch_1"]
    return f"the cause is not known: on a VNNI CPU, integer graphs with int8 weights were not measured slower at batch {batch}"


def _compressed_cell(profile: ModelProfile, reference: ModelProfile) -> str:
    """The compressed file's KiB and its ratio to the first stage's state dict, on every stage (the first too)."""
    if profile.compressed_bytes is None:
        return "–"
    return f"{profile.compressed_bytes / 1024:,.1f} ({profile.compressed_bytes / reference.size_bytes:.3f}x)"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _with_ratio(value: float, reference: float | None, entry: ReportEntry, report: Report, fmt: str) -> str:
    text = fmt.format(value)
    if entry is report.entries[0] or not reference:
        return text
    return f"{text} ({value / reference:.2f}x)"
