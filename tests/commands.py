"""Running the console scripts in a subprocess, shared by the tests of the command line and of sweeps."""

from __future__ import annotations

import subprocess
from pathlib import Path

# A quick report: latency at batch 1 only, two repeats.
QUICK_REPORT = [
    "callbacks.compression_report.latency_batch_sizes=[1]",
    "callbacks.compression_report.latency_repeats=2",
]


def run_command(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
