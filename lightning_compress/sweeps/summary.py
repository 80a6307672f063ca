"""One table and one Pareto plot from every job of a Hydra sweep folder.

Each job folder of a sweep (a folder with Hydra's ``.hydra/``) holds the job's ``report.json`` when it
finished, or ``failure.json`` when it raised (written by the ``lightning-compress`` command). The
summary has one row per job: the overrides that set it apart from the other jobs, its final stage (the last row of its report) and that
stage's size and latency as ratios to the job's first stage (its dense model), and whether it lies on
the Pareto front of validation accuracy against bytes and against latency. The fronts choose by validation
accuracy, as a search does (:mod:`lightning_compress.sweeps.objectives`); each job's test accuracy is shown
beside it, never used to choose. It is written as ``summary.csv``, ``summary.md`` and ``pareto.png`` in the
sweep folder, each atomically, with the metrics the jobs returned to an optimizing sweeper
(``optimized_metrics``); running it again rewrites the same files from the same jobs.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_compress.analysis.report import Report, ReportEntry
from lightning_compress.files import write_atomically
from lightning_compress.sweeps.pareto import ParetoPoint, plot_pareto

#: What an Optuna search or the summary can read off a job's final stage.
METRICS: dict[str, Callable[[ReportEntry], float | None]] = {
    "test_accuracy": lambda entry: entry.test_accuracy,
    "val_accuracy": lambda entry: entry.val_accuracy,
    "parameters": lambda entry: entry.profile.parameters,
    "nonzero_parameters": lambda entry: entry.profile.nonzero_parameters,
    "size_bytes": lambda entry: entry.profile.size_bytes,
    "onnx_bytes": lambda entry: entry.profile.onnx_bytes,
    "deployed_bytes": lambda entry: entry.profile.onnx_bytes or entry.profile.size_bytes,
    "compressed_bytes": lambda entry: entry.profile.compressed_bytes,
    "macs": lambda entry: entry.profile.macs,
    "latency_ms": lambda entry: _latency_ms(entry),
}


#: The accuracy the Pareto fronts rank jobs by, and the one a search optimizes: the validation split's.
SELECTION_ACCURACY = "val_accuracy"


def _latency_ms(entry: ReportEntry) -> float | None:
    """Median latency at the smallest measured batch size."""
    latency = entry.profile.latency
    return latency[min(latency)].median_ms if latency else None


def check_metrics(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the allowed metrics when one of ``names`` is not in :data:`METRICS`."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")


def stage_metrics(entry: ReportEntry, names: Sequence[str]) -> list[float]:
    """The named :data:`METRICS` of one report stage, e.g. the objectives of an Optuna trial.

    Example:
        >>> import torch
        >>> from lightning_compress.analysis import profile_model
        >>> entry = ReportEntry("after", profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=()), val_accuracy=0.5)
        >>> stage_metrics(entry, ["val_accuracy", "parameters"])
        [0.5, 10.0]
    """
    check_metrics(names)
    values = {name: METRICS[name](entry) for name in names}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(
            f"stage {entry.name!r} has no {', '.join(missing)} (test accuracy needs test=true, latency and ONNX size a report that measures them)"
        )
    return [float(value) for value in values.values()]


@dataclass
class JobResult:
    """One job of a sweep: where it ran, its overrides, what it returned to an optimizing sweeper, and either its
    report or why it failed."""

    folder: Path
    overrides: list[str]
    #: The job's ``optimized_metrics``: what it returned to an optimizing sweeper (Optuna); empty for none.
    optimized: list[str] = field(default_factory=list)
    #: The overrides that set this job apart: those not shared by every job of the sweep.
    swept: list[str] = field(default_factory=list)
    report: Report | None = None
    error: str | None = None
    pareto: dict[str, bool] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``completed`` (a report), ``failed`` (a ``failure.json``) or ``incomplete`` (neither: running or killed)."""
        return "completed" if self.report is not None else "failed" if self.error is not None else "incomplete"

    @property
    def accuracy(self) -> float | None:
        """The accuracy the fronts rank the job by (:data:`SELECTION_ACCURACY`) of its final trained run."""
        if self.report is None or not self.report.entries:
            return None
        return METRICS[SELECTION_ACCURACY](self.report.final_trained())

    def row(self, sweep_dir: Path) -> dict[str, Any]:
        """The job as one row of :data:`COLUMNS` (a completed job's metrics, a failed job's error)."""
        row: dict[str, Any] = {
            "job": str(self.folder.relative_to(sweep_dir)),
            "overrides": " ".join(self.swept),
            "status": self.status,
            "optimized_metrics": " ".join(self.optimized),
        }
        if self.report is not None and self.report.entries:
            final, first = self.report.final_trained(), self.report.entries[0]
            row["stage"] = final.name
            row.update({name: get(final) for name, get in METRICS.items()})
            for name in ("deployed_bytes", "latency_ms"):
                reference = METRICS[name](first)
                row[f"{name}_ratio"] = row[name] / reference if row[name] is not None and reference else None
            row.update({f"pareto_{axis}": self.pareto.get(axis, False) for axis in PARETO_AXES})
        row["error"] = self.error
        return row


#: The x-axes of the Pareto fronts: smaller is better on each, against higher accuracy.
PARETO_AXES = {"bytes": "deployed_bytes", "latency": "latency_ms"}
COLUMNS = [
    "job",
    "overrides",
    "status",
    "optimized_metrics",
    "stage",
    *METRICS,
    "deployed_bytes_ratio",
    "latency_ms_ratio",
    *(f"pareto_{axis}" for axis in PARETO_AXES),
    "error",
]


def collect(sweep_dir: str | os.PathLike[str]) -> list[JobResult]:
    """Every job folder under ``sweep_dir`` (a folder holding ``.hydra/``), in job-number order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder {str(sweep_dir)!r} does not exist")
    folders = sorted(
        (marker.parent for marker in sweep_dir.rglob(".hydra") if marker.parent != sweep_dir), key=_job_order(sweep_dir)
    )
    if not folders:
        raise FileNotFoundError(
            f"no job folder (one with a .hydra/ inside) under {str(sweep_dir)!r}: is it a Hydra sweep folder?"
        )
    jobs = [_read_job(folder) for folder in folders]
    shared = set.intersection(*(set(job.overrides) for job in jobs))
    for job in jobs:
        job.swept = [override for override in job.overrides if override not in shared]
    _mark_pareto([job for job in jobs if job.report is not None])
    return jobs


def _job_order(sweep_dir: Path) -> Callable[[Path], tuple]:
    """Numbered job folders (Hydra's ``${hydra.job.num}``) by number, then anything else by name."""

    def key(folder: Path) -> tuple:
        parts = folder.relative_to(sweep_dir).parts
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts)

    return key


def _read_job(folder: Path) -> JobResult:
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = list(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
    config_file = folder / ".hydra" / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    job = JobResult(folder=folder, overrides=overrides, optimized=list(config.get("optimized_metrics") or []))
    if (folder / "report.json").is_file():
        job.report = Report.from_dict(json.loads((folder / "report.json").read_text()))
    elif (folder / "failure.json").is_file():
        failure = json.loads((folder / "failure.json").read_text())
        job.error = f"{failure['type']}: {failure['message']}".replace("\n", " ")  # one line, for a table cell
    return job


def _mark_pareto(jobs: list[JobResult]) -> None:
    """A job is on a front when no other job is at least as accurate (:attr:`JobResult.accuracy`, on the validation
    split) and at least as small (fast), and better in one."""
    for axis, metric in PARETO_AXES.items():
        points = {
            id(job): (job.accuracy, METRICS[metric](job.report.final_trained())) for job in jobs if job.report.entries
        }
        for job in jobs:
            point = points.get(id(job))
            if point is None or None in point:
                continue
            job.pareto[axis] = not any(
                other is not None
                and None not in other
                and other[0] >= point[0]
                and other[1] <= point[1]
                and other != point
                for other in points.values()
            )


def write_summary(sweep_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Collect the jobs of ``sweep_dir`` and write ``summary.csv``, ``summary.md`` and ``pareto.png`` there.

    Example:
        >>> paths = write_summary("outputs/multirun/2026-11-29_10-00-00")  # doctest: +SKIP
        >>> sorted(paths)  # doctest: +SKIP
        ['csv', 'markdown', 'plot']
    """
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    rows = [job.row(sweep_dir) for job in jobs]
    paths = {"csv": sweep_dir / "summary.csv", "markdown": sweep_dir / "summary.md", "plot": sweep_dir / "pareto.png"}
    write_atomically(paths["csv"], lambda path: _write_csv(path, rows))
    write_atomically(paths["markdown"], lambda path: path.write_text(to_markdown(rows)))
    write_atomically(paths["plot"], lambda path: plot_pareto(pareto_points(jobs), path, _optimized(rows)))
    return paths


def pareto_points(jobs: list[JobResult]) -> dict[str, list[ParetoPoint]]:
    """The points of the Pareto plot, one list per axis of :data:`PARETO_AXES`: each job that has an
    accuracy and the axis' metric, with its test accuracy and its place on that axis' front (see :func:`_mark_pareto`)."""
    panels = {}
    for axis, metric in PARETO_AXES.items():
        panels[axis] = [
            ParetoPoint(
                cost,
                job.accuracy,
                job.report.final_trained().test_accuracy,
                job.folder.name,
                job.pareto.get(axis, False),
            )
            for job in jobs
            if job.report is not None and job.report.entries and job.accuracy is not None
            for cost in [METRICS[metric](job.report.final_trained())]
            if cost is not None
        ]
    return panels


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{column: _csv_cell(row.get(column)) for column in COLUMNS} for row in rows])


def _csv_cell(value: Any) -> Any:
    return "" if value is None else value


def _optimized(rows: list[dict[str, Any]]) -> list[str]:
    """The jobs' distinct ``optimized_metrics``, each as ``"val_accuracy, deployed_bytes"``; one for a search,
    none for a sweep that optimizes nothing."""
    return list(dict.fromkeys(row["optimized_metrics"].replace(" ", ", ") for row in rows if row["optimized_metrics"]))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table of the columns people read first, below a line that says what the fronts
    chose by and what the jobs optimized; failures listed below it with their error.

    Example:
        >>> row = {"job": "0", "overrides": "", "status": "completed", "optimized_metrics": "val_accuracy macs",
        ...        "stage": "pruning", "val_accuracy": 0.9, "test_accuracy": 0.85, "deployed_bytes": 2048,
        ...        "deployed_bytes_ratio": 0.5, "latency_ms": None, "latency_ms_ratio": None,
        ...        "pareto_bytes": True, "pareto_latency": False}
        >>> print(to_markdown([row]))
        Pareto fronts by validation accuracy (`val_accuracy`); test accuracy is shown, never used to choose (a choice by test accuracy reports an optimistic test score). Optimized: `val_accuracy, macs`.
        <BLANKLINE>
        | job | overrides | stage | val acc | test acc | deployed KiB | vs dense | latency (ms) | vs dense | Pareto (bytes / latency) |
        |---|---|---|---|---|---|---|---|---|---|
        | 0 |  | pruning | 90.00% | 85.00% | 2.0 | 0.500x | – | – | yes / – |
        <BLANKLINE>
    """
    note = (
        f"Pareto fronts by validation accuracy (`{SELECTION_ACCURACY}`); test accuracy is shown, never used to choose "
        "(a choice by test accuracy reports an optimistic test score)."
        + "".join(f" Optimized: `{metrics}`." for metrics in _optimized(rows))
    )
    header = [
        "job",
        "overrides",
        "stage",
        "val acc",
        "test acc",
        "deployed KiB",
        "vs dense",
        "latency (ms)",
        "vs dense",
        "Pareto (bytes / latency)",
    ]
    lines = [note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["status"] != "completed":
            continue
        lines.append(
            "| "
            + " | ".join(
                [
                    row["job"],
                    f"`{row['overrides']}`" if row["overrides"] else "",
                    row["stage"],
                    _format(row["val_accuracy"], lambda v: f"{100 * v:.2f}%"),
                    _format(row["test_accuracy"], lambda v: f"{100 * v:.2f}%"),
                    _format(row["deployed_bytes"], lambda v: f"{v / 1024:,.1f}"),
                    _format(row["deployed_bytes_ratio"], lambda v: f"{v:.3f}x"),
                    _format(row["latency_ms"], lambda v: f"{v:.3f}"),
                    _format(row["latency_ms_ratio"], lambda v: f"{v:.3f}x"),
                    " / ".join("yes" if row[f"pareto_{axis}"] else "–" for axis in PARETO_AXES),
                ]
            )
            + " |"
        )
    problems = [row for row in rows if row["status"] != "completed"]
    if problems:
        lines += ["", "Jobs without a report:", ""]
        lines += [
            f"- {row['job']} (`{row['overrides']}`): {row['status']}" + (f", {row['error']}" if row["error"] else "")
            for row in problems
        ]
    return "\n".join(lines) + "\n"


def _format(value: float | None, fmt: Callable[[float], str]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt(value)
