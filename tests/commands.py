"""Running the console scripts in a subprocess, shared by the tests of the command line and of sweeps."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

# A quick report: latency at batch 1 only, two repeats.
QUICK_REPORT = [
    "callbacks.compression_report.latency_batch_sizes=[1]",
    "callbacks.compression_report.latency_repeats=2",
]
# A quick report timed in eager PyTorch: no stage is exported to ONNX for its latency (seconds an export), so
# no ONNX size is measured; for the tests that check none.
EAGER_QUICK_REPORT = [*QUICK_REPORT, "callbacks.compression_report.latency_runtime=torch"]
#: How long a process of a finished command may take to exit after it (multiprocessing's resource tracker
#: and joblib's workers exit when the command's end closes their pipe).
EXIT_GRACE_S = 30.0


def run_command(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None, exited_unwaited_ok: bool = True
) -> subprocess.CompletedProcess:
    """Run a command in a session of its own and fail if a process of that session (a DDP rank, a sweep's
    worker) still runs :data:`EXIT_GRACE_S` after the command ended; with ``exited_unwaited_ok=False``, also
    if one exited without its parent waiting for it (it outlived its parent). Whatever is left is killed, on
    a timeout too, so that no test leaves a process behind."""
    with subprocess.Popen(
        list(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            left = processes_outliving(process.pid)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    running = {pid: state for pid, state in left.items() if not state.startswith("Z")}
    assert not running, f"{args[0]} left processes running: {running}\n{stderr}"
    assert exited_unwaited_ok or not left, f"{args[0]} left processes that outlived their parent: {left}\n{stderr}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def processes_outliving(session: int) -> dict[int, str]:
    """The processes of a session but its leader, by pid, with their state and parent (``Z``: exited, never
    waited for), once none still runs or :data:`EXIT_GRACE_S` passed; empty where there is no ``/proc``."""
    deadline = time.monotonic() + EXIT_GRACE_S
    while True:
        found = {}
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone since the listing
                continue
            state, parent, _, session_id = stat.rpartition(")")[2].split()[:4]
            if int(session_id) == session and int(entry.name) != session:
                found[int(entry.name)] = f"{state} (parent {parent})"
        if all(state.startswith("Z") for state in found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
