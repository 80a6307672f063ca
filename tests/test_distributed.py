"""The end of a distributed job: its process group ends cleanly, and a launched rank never outlives its launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch.distributed

from lightning_compress.distributed import LAUNCHER_PID, job_processes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")

# A launched rank: it asks to go with its launcher, says so, and would then sleep for ten minutes.
RANK = """
import sys, time
from lightning_compress.distributed import exit_with_launcher
exit_with_launcher()
print("ready", flush=True)
if sys.argv[1:] == ["sleep"]:
    time.sleep(600)
"""

# A launcher: it starts the rank, prints its pid once the rank is ready, and sleeps until it is killed.
LAUNCHER = f"""
import os, subprocess, sys, time
env = {{**os.environ, "LOCAL_RANK": "1", "{LAUNCHER_PID}": str(os.getpid())}}
rank = subprocess.Popen([sys.executable, "-c", {RANK!r}, "sleep"], env=env, stdout=subprocess.PIPE, text=True)
assert rank.stdout.readline() == "ready\\n"
print(rank.pid, flush=True)
time.sleep(600)
"""

# Kills the launcher and reports how its orphaned rank ended, waiting for it at most a minute. It makes itself
# the orphans' subreaper, so the rank becomes its child, is waited for here, and no zombie is left.
WATCH = f"""
import ctypes, os, subprocess, sys, time
assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
launcher = subprocess.Popen([sys.executable, "-c", {LAUNCHER!r}], stdout=subprocess.PIPE, text=True)
rank = int(launcher.stdout.readline())
launcher.kill()
launcher.wait()
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    pid, status = os.waitpid(rank, os.WNOHANG)
    if pid:
        print("signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
        break
    time.sleep(0.05)
else:
    os.kill(rank, 9)
    os.waitpid(rank, 0)
    print("still running a minute after its launcher died")
"""


@linux_only
def test_a_launched_rank_is_killed_when_its_launcher_dies() -> None:
    watched = subprocess.run([sys.executable, "-c", WATCH], capture_output=True, text=True, timeout=180)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.strip() == f"signal {int(signal.SIGKILL)}"


@linux_only
def test_a_launched_rank_whose_launcher_died_before_it_started_goes_at_once() -> None:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait(timeout=60)
    # the rank whose launcher is gone, and the same rank whose launcher (this process) lives, side by side:
    # each spends its seconds importing the library
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**os.environ, "LOCAL_RANK": "1", LAUNCHER_PID: str(launcher)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for launcher in (gone.pid, os.getpid())
    ]
    try:
        (orphaned_stdout, _), (launched_stdout, _) = (rank.communicate(timeout=120) for rank in ranks)
    finally:
        for rank in ranks:  # neither is left running on a timeout
            rank.kill()
            rank.wait()
    orphaned, launched = ranks
    assert orphaned.returncode == -signal.SIGKILL and orphaned_stdout == b""
    assert launched.returncode == 0 and launched_stdout == b"ready\n"


@pytest.fixture
def process_group(tmp_path):
    """A one-rank gloo process group of this process, destroyed afterwards if the test left it up."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_a_job_that_ends_waits_for_the_ranks_it_launched_and_then_ends_its_process_group(process_group) -> None:
    assert LAUNCHER_PID not in os.environ
    with job_processes() as launched:
        assert os.environ[LAUNCHER_PID] == str(os.getpid())  # what the ranks it launches inherit
        launched.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"]))
    assert launched[0].returncode == 0  # waited for, not left to exit after the job
    assert not torch.distributed.is_initialized()
    assert LAUNCHER_PID not in os.environ


def test_a_job_that_fails_kills_the_ranks_it_launched_and_ends_its_process_group(process_group) -> None:
    with pytest.raises(RuntimeError, match="a run failed"), job_processes() as launched:
        launched.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        raise RuntimeError("a run failed")
    assert launched[0].returncode == -signal.SIGKILL
    assert not torch.distributed.is_initialized()
    assert LAUNCHER_PID not in os.environ
