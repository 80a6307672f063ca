"""The DDP sweep test, run again and again while another process keeps a core busy: does it ever fail, and
does any process of it outlive it?

    python benchmarks/ddp_sweep_stress.py --runs 10

Each round runs ``tests/test_sweeps.py``'s two-job DDP sweep test in pytest and then lists every orphan it
made: each process started during the round whose parent is now init (pid 1), running or exited but never
waited for. Writes ``results/ddp_sweep_stress.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parent.parent

TEST = "tests/test_sweeps.py::test_a_ddp_sweep_runs_each_job_once_on_two_processes_with_identical_masks_and_ranges"


def orphans_started_after(ticks: float) -> dict[int, str]:
    """Processes whose parent is init and that started ``ticks`` (clock ticks since boot) or later, by pid,
    with their state (``Z``: exited, never waited for) and command."""
    orphans = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(") ")
        fields = rest.split()
        if fields[1] == "1" and int(fields[19]) >= ticks:  # ppid; starttime (field 22 of proc(5))
            orphans[int(entry.name)] = f"{fields[0]} {name}"
    return orphans


def now_in_ticks() -> float:
    return float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")


def one_round(timeout_s: float) -> dict:
    """One pytest run of the DDP sweep test: its exit code, seconds, and the processes it left."""
    start, since = time.perf_counter(), now_in_ticks()
    with subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as pytest:
        try:
            output, _ = pytest.communicate(timeout=timeout_s)
            code = pytest.returncode
        except subprocess.TimeoutExpired:
            pytest.kill()
            output, code = pytest.communicate()[0], "timeout"
    time.sleep(1.0)  # a process that outlives the test by a moment is an orphan all the same
    left = orphans_started_after(since)
    return {
        "exit_code": code,
        "seconds": round(time.perf_counter() - start, 1),
        "orphans": left,
        "tail": "" if code == 0 else output[-3000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one round may take")
    args = parser.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the other core, busy
    try:
        rounds = []
        for index in range(args.runs):
            rounds.append(one_round(args.timeout))
            print(
                f"round {index}: {rounds[-1]['exit_code']} in {rounds[-1]['seconds']} s, orphans {rounds[-1]['orphans']}"
            )
    finally:
        busy.kill()
        busy.wait()
    passed = sum(entry["exit_code"] == 0 for entry in rounds)
    clean = sum(not entry["orphans"] for entry in rounds)
    markdown = (
        "| rounds | passed | left no orphan | median seconds |\n|---|---|---|---|\n"
        f"| {len(rounds)} | {passed} | {clean} | {statistics.median(entry['seconds'] for entry in rounds):.0f} |\n"
    )
    write_results("ddp_sweep_stress", {"test": TEST, "busy_cores": 1}, {"rounds": rounds}, markdown)


if __name__ == "__main__":
    main()
