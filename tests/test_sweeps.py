from __future__ import annotations

import csv
import json
import sys

from commands import QUICK_REPORT, run_command

from lightning_compress.sweeps import collect

# One epoch on the digits, dense and pruned once at its start, no ONNX file: a sweep job of a few seconds.
QUICK_JOB = [
    "~compression/quantization",
    "compression.pruning.schedule=oneshot",
    "compression.pruning.start_epoch=0",
    "trainer.max_epochs=1",
    "half_precision=null",
    "export=null",
    *QUICK_REPORT,
]


def read_csv(path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_job_sweep_in_parallel_writes_one_summary_row_per_job(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    done = run_command(
        "lightning-compress",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "compression.pruning.amount=0.5,0.9",
        *QUICK_JOB,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr
    rows = read_csv(sweep / "summary.csv")
    assert [(row["job"], row["overrides"], row["status"], row["stage"]) for row in rows] == [
        ("0", "compression.pruning.amount=0.5", "completed", "pruning"),
        ("1", "compression.pruning.amount=0.9", "completed", "pruning"),
    ]
    for row, amount in zip(rows, (0.5, 0.9)):
        stages = json.loads((sweep / row["job"] / "report.json").read_text())["stages"]
        assert float(row["test_accuracy"]) == stages[-1]["test_accuracy"]
        assert int(row["nonzero_parameters"]) == stages[-1]["nonzero_parameters"]
        sparsity = stages[-1]["weight_sparsity"]
        assert sparsity["zeros"] >= round(amount * sparsity["total"])
        assert float(row["deployed_bytes_ratio"]) == stages[-1]["size_bytes"] / stages[0]["size_bytes"]
    assert "| 0 | `compression.pruning.amount=0.5` | pruning |" in (sweep / "summary.md").read_text()
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| job | overrides |" in done.stdout  # the summary is printed when the sweep ends


def test_a_failed_job_of_a_submitit_sweep_keeps_the_others_and_the_summary_says_why(tmp_path) -> None:
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
    assert failure["type"] == "InstantiationException" and reason in failure["message"] and "full_key: compression.pruning" in failure["message"]
    assert "Traceback" in failure["traceback"]
    assert not (sweep / "1" / "dense").exists()  # the recipes are checked before any run of the job trains
    summary = run_command(sys.executable, "-m", "lightning_compress.sweeps.commands", str(sweep), cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr
    rows = read_csv(sweep / "summary.csv")
    assert [(row["job"], row["status"]) for row in rows] == [("0", "completed"), ("1", "failed")]
    assert rows[0]["error"] == "" and reason in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[0]["pareto_bytes"] == "True"
    assert f"- 1 (`compression.pruning.amount=1.5`): failed, InstantiationException: Error in call to target" in summary.stdout
    files = {name: (sweep / name).read_bytes() for name in ("summary.csv", "summary.md")}
    again = run_command(sys.executable, "-m", "lightning_compress.sweeps.commands", str(sweep), cwd=tmp_path)
    assert again.returncode == 0
    assert {name: (sweep / name).read_bytes() for name in files} == files  # idempotent
    assert [job.status for job in collect(sweep)] == ["completed", "failed"]


def test_summary_of_a_folder_without_jobs_is_a_clear_error(tmp_path) -> None:
    done = run_command(sys.executable, "-m", "lightning_compress.sweeps.commands", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert "no job folder (one with a .hydra/ inside)" in done.stderr
