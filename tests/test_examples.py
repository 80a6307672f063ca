from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_every_example_is_tested() -> None:
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == [
        "measure_model.py",
        "prune_and_report.py",
        "prune_plain_pytorch.py",
        "train_and_report.py",
    ]


def test_train_and_report(tmp_path, monkeypatch, capsys) -> None:
    run_example(
        "train_and_report.py",
        "--max-epochs",
        "1",
        "--output-dir",
        str(tmp_path),
        "--latency-repeats",
        "2",
        monkeypatch=monkeypatch,
    )
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert [stage["name"] for stage in stages] == ["before", "after"]
    assert stages[-1]["test_accuracy"] is not None
    assert "report written to" in capsys.readouterr().out


def test_measure_model(monkeypatch, capsys) -> None:
    run_example(
        "measure_model.py", "--image-size", "8", "--batch-sizes", "1", "--repeats", "1", monkeypatch=monkeypatch
    )
    out = capsys.readouterr().out
    assert "half of conv weights zeroed" in out
    assert "11,173,962" in out  # ResNet-18 with 10 classes and the small stem


@pytest.mark.parametrize("granularity, amount", [("unstructured", "0.9"), ("channel", "0.5")])
def test_prune_and_report(tmp_path, monkeypatch, capsys, granularity: str, amount: str) -> None:
    args = ["--granularity", granularity, "--amount", amount, "--max-epochs", "2", "--output-dir", str(tmp_path)]
    run_example("prune_and_report.py", *args, monkeypatch=monkeypatch)
    before, after = json.loads((tmp_path / "report.json").read_text())["stages"]
    if granularity == "channel":
        assert after["parameters"] < 0.3 * before["parameters"]
    else:
        assert after["weight_sparsity"]["zeros"] == round(0.9 * after["weight_sparsity"]["total"])
    assert "non-zero parameters" in capsys.readouterr().out


def test_prune_plain_pytorch(monkeypatch, capsys) -> None:
    run_example("prune_plain_pytorch.py", "--amount", "0.8", "--epochs", "4", monkeypatch=monkeypatch)
    assert "sparsity 0.800," in capsys.readouterr().out  # to the element, from a plain loop
