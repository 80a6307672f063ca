"""The code passes ruff's lint and is in ruff's format (settings in pyproject.toml), so the suite keeps it so."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes(command: list[str]) -> None:
    ruff = shutil.which("ruff")
    assert ruff is not None, 'ruff is part of the test tools: pip install -e ".[test]"'
    completed = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
