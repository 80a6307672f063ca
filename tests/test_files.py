from __future__ import annotations

import os
import subprocess
import sys

from lightning_compress.files import write_atomically


def test_a_write_removes_the_temporaries_of_dead_writers_and_keeps_a_live_ones(tmp_path) -> None:
    target = tmp_path / "report.png"
    names = []
    write_atomically(target, lambda temporary: names.append(temporary.name) or temporary.write_bytes(b"first"))
    (name,) = names
    assert name.startswith(f".report-{os.getpid()}@") and name.endswith(
        ".png"
    )  # matplotlib reads the format from the suffix
    with subprocess.Popen([sys.executable, "-c", ""]) as finished:
        finished.wait(timeout=30)
    live = tmp_path / name  # as if this process were writing the target right now
    dead = tmp_path / name.replace(f"-{os.getpid()}@", f"-{finished.pid}@")  # left by a writer killed with -9
    other_target = tmp_path / name.replace(".report-", ".report_old-").replace(f"-{os.getpid()}@", f"-{finished.pid}@")
    for leftover in (live, dead, other_target):
        leftover.write_bytes(b"")
    write_atomically(target, lambda temporary: temporary.write_bytes(b"second"))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([name, other_target.name, "report.png"])
    assert target.read_bytes() == b"second"
