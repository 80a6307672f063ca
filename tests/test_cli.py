from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from lightning_compress.cli import train


def test_default_app_runs_with_fast_dev_run_and_writes_the_report(compose_config, tmp_path) -> None:
    cfg = compose_config("trainer.fast_dev_run=true", f"output_dir={tmp_path}", "callbacks.compression_report.latency_repeats=2")
    report = train(cfg)
    assert [entry.name for entry in report.entries] == ["before", "after"]
    assert report.entries[-1].test_accuracy is not None
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert stages[-1]["test_accuracy"] == report.entries[-1].test_accuracy
    assert (tmp_path / "report.md").read_text() == report.to_markdown()
    assert (tmp_path / "report.png").stat().st_size > 0


def test_a_resumed_run_continues_from_its_last_checkpoint(compose_config, tmp_path) -> None:
    common = [f"output_dir={tmp_path}", "callbacks.compression_report.latency_batch_sizes=[1]", "callbacks.compression_report.latency_repeats=2", "test=false"]
    first = train(compose_config("trainer.max_epochs=1", *common))
    resumed = train(compose_config("trainer.max_epochs=2", f"ckpt_path={tmp_path}/checkpoints/last.ckpt", *common))
    assert resumed.entry("before") == first.entry("before")
    with open(tmp_path / "csv" / "version_1" / "metrics.csv") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row["train/loss_epoch"]}
    assert epochs == {"1"}  # the resumed run trained epoch 1 only


def run_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_console_script_prints_the_report(tmp_path) -> None:
    done = run_command(
        "lightning-compress",
        "trainer.fast_dev_run=true",
        "callbacks.compression_report.latency_repeats=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Compression report" in done.stdout
    assert (tmp_path / "run" / "report.json").is_file()


def test_python_dash_m_reports_a_typo_as_hydras_error(tmp_path) -> None:
    done = run_command(sys.executable, "-m", "lightning_compress", "trainer.max_epoch=3", cwd=tmp_path)
    assert done.returncode == 1
    assert "Could not override 'trainer.max_epoch'" in done.stderr
    assert "Traceback" not in done.stderr


def test_ddp_config_trains_with_two_cpu_processes(tmp_path) -> None:
    done = run_command(
        "lightning-compress",
        "trainer=ddp",
        "trainer.fast_dev_run=true",
        "callbacks.compression_report.latency_repeats=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in done.stdout + done.stderr
    stages = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    assert [stage["name"] for stage in stages] == ["before", "after"]
