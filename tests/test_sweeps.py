from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from commands import EAGER_QUICK_REPORT, QUICK_REPORT, run_command
from omegaconf import OmegaConf

from lightning_compress.analysis import Report, ReportEntry, profile_model
from lightning_compress.analysis.plots import new_figure
from lightning_compress.job import train
from lightning_compress.sweeps import collect, pareto, write_summary
from lightning_compress.sweeps.commands import main as summary_command
from lightning_compress.sweeps.objectives import objectives
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
    test_accuracy: float | None = None,
    optimized: list[str] | None = None,
) -> None:
    """A job folder as a sweep leaves it: overrides, its ``optimized_metrics`` in its config if given, and a report
    with one final stage (``accuracy`` on the validation split), or a failure."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {override}\n" for override in overrides))
    if optimized is not None:
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metrics": optimized}))
    if accuracy is not None:
        profile = dataclasses.replace(
            profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=()), onnx_bytes=onnx_bytes
        )
        final = ReportEntry("pruning", profile, val_accuracy=accuracy, test_accuracy=test_accuracy)
        report = Report(entries=[ReportEntry("before", profile), final])
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


def test_the_front_chooses_by_validation_accuracy_and_shows_the_test_accuracy_of_the_chosen(
    tmp_path, monkeypatch
) -> None:
    objectives = ["val_accuracy", "deployed_bytes"]
    write_job(tmp_path / "0", ["amount=0.5"], accuracy=0.90, onnx_bytes=2048, test_accuracy=0.80, optimized=objectives)
    write_job(tmp_path / "1", ["amount=0.6"], accuracy=0.85, onnx_bytes=2048, test_accuracy=0.95, optimized=objectives)
    figures = []  # the Pareto plot's figure and axes, as drawn

    def recorded_figure(*args, **kwargs):
        figures.append(new_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(pareto, "new_figure", recorded_figure)
    write_summary(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert [
        (row["val_accuracy"], row["test_accuracy"], row["pareto_bytes"], row["optimized_metrics"]) for row in rows
    ] == [
        ("0.9", "0.8", "True", "val_accuracy deployed_bytes"),  # job 1's better test accuracy chooses nothing
        ("0.85", "0.95", "False", "val_accuracy deployed_bytes"),
    ]
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.startswith(
        "Pareto fronts by validation accuracy (`val_accuracy`); test accuracy is shown, never used to choose"
    )
    assert "Optimized: `val_accuracy, deployed_bytes`." in markdown
    assert "| 0 | `amount=0.5` | pruning | 90.00% | 80.00% | 2.0 | 1.000x | – | – | yes / – |" in markdown
    assert "| 1 | `amount=0.6` | pruning | 85.00% | 95.00% | 2.0 | 1.000x | – | – | – / – |" in markdown
    figure, (bytes_panel, _) = figures[0]
    assert "optimized: val_accuracy, deployed_bytes" in figure.get_suptitle()
    assert bytes_panel.get_title() == "Validation accuracy against bytes"
    drawn = {collection.get_label(): collection.get_offsets().tolist() for collection in bytes_panel.collections}
    assert drawn == {
        "job (validation accuracy)": [[2.0, 90.0], [2.0, 85.0]],
        "test accuracy of a front job": [[2.0, 80.0]],
    }


def test_a_search_optimizes_validation_accuracy_and_its_summary_shows_both_accuracies(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    done = run_command(
        "lightning-compress",
        "hparams_search=prune_quantize",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.population_size=2",
        "trainer.fast_dev_run=true",  # the test on one batch, the validation accuracy on the whole split: they differ
        "export=null",
        *EAGER_QUICK_REPORT,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = read_csv(sweep / "summary.csv")
    markdown = (sweep / "summary.md").read_text()
    assert [row["status"] for row in rows] == ["completed", "completed"]
    for row in rows:
        final = json.loads((sweep / row["job"] / "report.json").read_text())["stages"][-1]
        accuracies = (float(row["val_accuracy"]), float(row["test_accuracy"]))
        assert accuracies == (final["val_accuracy"], final["test_accuracy"]) and None not in accuracies
        assert row["optimized_metrics"] == "val_accuracy deployed_bytes"
        assert f"| {100 * accuracies[0]:.2f}% | {100 * accuracies[1]:.2f}% |" in markdown
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    returned = {tuple(solution["values"]) for solution in results["solutions"]}
    assert returned and returned <= {(float(row["val_accuracy"]), float(row["deployed_bytes"])) for row in rows}
    assert "Optimized: `val_accuracy, deployed_bytes`." in markdown and markdown in done.stdout  # printed at the end


def test_a_job_s_result_is_its_last_trained_run_never_a_converted_copy(tmp_path) -> None:
    """`runs=[dense]` with a half-precision row: the summary and the objective read the dense run (its test accuracy,
    its latency in the reference's runtime), not the bfloat16 copy the report adds after it."""
    profile = profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=())
    dense = ReportEntry("dense", profile, val_accuracy=0.9, test_accuracy=0.88)
    half = ReportEntry("dense bfloat16", profile, val_accuracy=0.89, derived_from="dense")
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    (tmp_path / "0" / "report.json").write_text(json.dumps(Report(entries=[dense, half]).to_dict()))
    write_summary(tmp_path)
    (row,) = read_csv(tmp_path / "summary.csv")
    assert (row["stage"], row["val_accuracy"], row["test_accuracy"]) == ("dense", "0.9", "0.88")
    stored = Report.from_dict(json.loads((tmp_path / "0" / "report.json").read_text()))
    assert stored.entries[1].derived_from == "dense" and stored.final_trained().name == "dense"
    assert objectives(OmegaConf.create({"optimized_metrics": ["test_accuracy"]}), stored) == 0.88


def test_the_job_marks_its_half_precision_rows_as_converted_copies(compose_config, tmp_path) -> None:
    report = train(
        compose_config(
            "runs=[dense]", "trainer.max_epochs=1", "trainer.limit_train_batches=4", f"output_dir={tmp_path}"
        )
    )
    assert [(entry.name, entry.derived_from) for entry in report.entries] == [
        ("dense", None),
        ("dense bfloat16", "dense"),
    ]
    assert report.final_trained().name == "dense" and report.final_trained().test_accuracy is not None


def test_a_sweep_run_again_keeps_its_finished_jobs_and_resumes_the_interrupted_one(tmp_path) -> None:
    """Job 1 as a kill after its first epoch leaves it (a checkpoint of epoch 0, no report): the sweep run again
    resumes it, trains job 0, and run once more keeps both as they are and writes the summary again."""
    sweep = tmp_path / "sweep"
    job = [*QUICK_JOB, "trainer.max_epochs=2"]
    interrupted = run_command(
        "lightning-compress", "seed=2", *QUICK_JOB, "trainer.max_epochs=1", f"hydra.run.dir={sweep / '1'}", cwd=tmp_path
    )
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    for report in (sweep / "1").rglob("report.json"):
        report.unlink()
    sentinel = sweep / "1" / "pruning" / "checkpoints" / "kept-if-resumed"  # a fresh start would empty the folder
    sentinel.write_text("")
    sweep_command = ("lightning-compress", "-m", "seed=1,2", *job, f"hydra.sweep.dir={sweep}")
    again = run_command(*sweep_command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    last = torch.load(sweep / "1" / "pruning" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and sentinel.exists()  # resumed from epoch 0, its folder as it was
    assert not (sweep / "1" / "pruning" / "checkpoints" / "last-v1.ckpt").exists()
    assert [job.status for job in collect(sweep)] == ["completed", "completed"]
    reports = {number: (sweep / number / "report.json").stat().st_mtime_ns for number in ("0", "1")}
    (sweep / "summary.csv").unlink()
    once_more = run_command(*sweep_command, cwd=tmp_path)
    assert once_more.returncode == 0, once_more.stderr[-3000:]
    assert {number: (sweep / number / "report.json").stat().st_mtime_ns for number in ("0", "1")} == reports
    assert [row["status"] for row in read_csv(sweep / "summary.csv")] == ["completed", "completed"]
