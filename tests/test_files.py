from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_file_written_atomically_has_the_mode_the_umask_gives(tmp_path, umask: int) -> None:
    """As ``open()`` would make it (0644 under umask 022), not the 0600 of a temporary file."""
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "model.onnx", lambda temporary: temporary.write_bytes(b"graph"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.onnx").stat().st_mode) == 0o666 & ~umask
