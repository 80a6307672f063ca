from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from commands import EAGER_QUICK_REPORT, QUICK_REPORT, run_command

from lightning_compress.analysis import Report, ReportEntry, profile_model
from lightning_compress.sweeps import collect
from lightning_compress.sweeps.commands import main as summary_command
from lightning_compress.sweeps.summary import to_markdown

# One epoch of 4 batches of the digits, pruned once at its start (the job's one run), no ONNX export: a sweep job
# of a few seconds.
QUICK_JOB = [
    "~compression/quantization",
    "runs=[combined]",
    "compression.pruning.schedule=oneshot",
    "compression.pruning.start_epoch=0",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "half_precision=null",
    "export=null",
    *EAGER_QUICK_REPORT,
]


def read_csv(path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_failed_job_of_a_submitit_sweep_keeps_the_others_and_the_summary_says_why(tmp_path, capsys) -> None:
    sweep = tmp_path / "sweep"
    done = run_command(
        "lightning-compress",
        "-m",
        "hydra/launcher=local_processes",  # submitit, as on a SLURM cluster, with local processes
        "compression.pruning.amount=0.5,1.5",
        *QUICK_JOB,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    assert (sweep / ".submitit").is_dir()
    assert (sweep / "0" / "report.json").is_file()
    failure = json.loads((sweep / "1" / "failure.json").read_text())
    reason = "ValueError('amount must be in [0, 1), got 1.5')"
    assert (
        failure["type"] == "InstantiationException"
        and reason in failure["message"]
        and "full_key: compression.pruning" in failure["message"]
    )
    assert "Traceback" in failure["traceback"]
    assert not (sweep / "1" / "pruning").exists()  # the recipes are checked before the job's run trains
    summary_command([str(sweep)])  # lightning-compress-summary's main, in this process (a new one imports for seconds)
    rows = read_csv(sweep / "summary.csv")
    assert [(row["job"], row["status"]) for row in rows] == [("0", "completed"), ("1", "failed")]
    assert rows[0]["error"] == "" and reason in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[0]["pareto_bytes"] == "True"
    assert (
        "- 1 (`compression.pruning.amount=1.5`): failed, InstantiationException: Error in call to target"
        in capsys.readouterr().out
    )
    files = {name: (sweep / name).read_bytes() for name in ("summary.csv", "summary.md")}
    summary_command([str(sweep)])  # again
    assert {name: (sweep / name).read_bytes() for name in files} == files  # idempotent
    assert [job.status for job in collect(sweep)] == ["completed", "failed"]


def test_summary_of_a_folder_without_jobs_is_a_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        summary_command([str(tmp_path)])
    assert stopped.value.code == 2
    assert "no job folder (one with a .hydra/ inside)" in capsys.readouterr().err


def test_a_ddp_sweep_runs_each_job_once_on_two_processes_with_identical_masks_and_ranges(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    done = run_command(
        "lightning-compress",
        "-m",
        "trainer=ddp",
        "compression.pruning.amount=0.5,0.9",
        "runs=[combined]",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "compression.pruning.start_epoch=1",
        "compression.pruning.end_epoch=1",
        "compression.quantization.start_epoch=1",
        "compression.quantization.freeze_observers_epoch=null",  # observers move until the end, on each rank's own batches
        "compression.quantization.freeze_bn_epoch=null",
        "half_precision=null",
        "export=null",
        *QUICK_REPORT,
        "+callbacks.rank_state._target_=rank_state.SaveRankState",
        "+callbacks.rank_state.directory=${output_dir}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        exited_unwaited_ok=False,  # every job waits for the rank it launched
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # one second process per job
    assert sorted(path.name for path in sweep.iterdir() if path.is_dir()) == ["0", "1"]
    assert not (tmp_path / "outputs").exists()  # the second processes wrote into their job's folder, nowhere else
    for job, amount in (("0", 0.5), ("1", 0.9)):
        first, second = (torch.load(sweep / job / "pruning+quantization" / f"rank{rank}.pt") for rank in (0, 1))
        assert first["masks"].keys() == second["masks"].keys() and all(
            torch.equal(first["masks"][k], second["masks"][k]) for k in first["masks"]
        )
        pruned = sum(int((~mask).sum()) for name, mask in first["masks"].items() if name.endswith("weight"))
        assert pruned >= round(
            amount * sum(mask.numel() for name, mask in first["masks"].items() if name.endswith("weight"))
        )
        ranges = [name for name in first["state"] if "input_quantizer.observer.max_val" in name]
        assert ranges and all(float(first["state"][name]) > 0 for name in ranges)
        assert first["state"].keys() == second["state"].keys()
        different = [name for name in first["state"] if not torch.equal(first["state"][name], second["state"][name])]
        assert different == []
    rows = read_csv(sweep / "summary.csv")
    assert [(row["job"], row["overrides"], row["status"], row["stage"]) for row in rows] == [
        ("0", "compression.pruning.amount=0.5", "completed", "pruning+quantization"),
        ("1", "compression.pruning.amount=0.9", "completed", "pruning+quantization"),
    ]
    for row in rows:  # one row per job, read from its report
        stages = json.loads((sweep / row["job"] / "report.json").read_text())["stages"]
        assert float(row["test_accuracy"]) == stages[-1]["test_accuracy"]
        assert int(row["nonzero_parameters"]) == stages[-1]["nonzero_parameters"]
        assert float(row["deployed_bytes_ratio"]) == stages[-1]["onnx_bytes"] / stages[0]["onnx_bytes"]
    assert "| 0 | `compression.pruning.amount=0.5` | pruning+quantization |" in (sweep / "summary.md").read_text()
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| job | overrides |" in done.stdout  # the summary is printed when the sweep ends


def write_job(
    folder: Path,
    overrides: list[str],
    accuracy: float | None = None,
    onnx_bytes: int | None = None,
    error: str | None = None,
) -> None:
    """A job folder as a sweep leaves it: overrides, and a report with one final stage, or a failure."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {override}\n" for override in overrides))
    if accuracy is not None:
        profile = dataclasses.replace(
            profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=()), onnx_bytes=onnx_bytes
        )
        report = Report(
            entries=[ReportEntry("before", profile), ReportEntry("pruning", profile, test_accuracy=accuracy)]
        )
        (folder / "report.json").write_text(json.dumps(report.to_dict()))
    if error is not None:
        (folder / "failure.json").write_text(json.dumps({"type": "ValueError", "message": error, "traceback": ""}))


def test_pareto_marks_the_jobs_no_other_job_beats_on_both_accuracy_and_bytes(tmp_path) -> None:
    points = [(0.90, 100), (0.85, 50), (0.85, 120), (0.90, 100), (0.80, 50)]  # 2 is beaten by 0; 4 by 1; 0 and 3 tie
    for number, (accuracy, size) in enumerate(points):
        write_job(tmp_path / str(number), ["seed=1", f"compression.pruning.amount=0.{number}"], accuracy, size)
    write_job(
        tmp_path / "5", ["seed=1", "compression.pruning.amount=1.5"], error="amount must be in [0, 1)\nsee the docs"
    )
    write_job(tmp_path / "10", ["seed=1", "compression.pruning.amount=0.7"])  # still running, or killed
    jobs = collect(tmp_path)
    assert [job.folder.name for job in jobs] == ["0", "1", "2", "3", "4", "5", "10"]  # by job number, not by name
    assert [job.status for job in jobs] == ["completed"] * 5 + ["failed", "incomplete"]
    assert [job.pareto.get("bytes") for job in jobs] == [True, True, False, True, False, None, None]
    assert jobs[0].pareto.get("latency") is None  # no latency measured: no front
    assert [job.swept for job in jobs][:2] == [
        ["compression.pruning.amount=0.0"],
        ["compression.pruning.amount=0.1"],
    ]  # seed=1 is shared
    assert jobs[5].error == "ValueError: amount must be in [0, 1) see the docs"
    markdown = to_markdown([job.row(tmp_path) for job in jobs])
    assert markdown.count("| pruning |") == 5
    assert "- 10 (`compression.pruning.amount=0.7`): incomplete" in markdown
