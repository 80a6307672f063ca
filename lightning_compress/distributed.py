"""The processes of a distributed job: a clean end of its process group, and no rank that outlives it.

Lightning's DDP launcher starts the further ranks of a machine as child processes of the first, and never
waits for them: the first rank may exit, or start the next job of a sweep, while another still tears its
process group down, and a rank whose launcher died waits on a collective for ever.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import lightning as L
import torch.distributed

#: How long the first rank waits for the ranks it launched to exit once every rank has ended the job.
EXIT_TIMEOUT_S = 120.0
#: The environment variable that tells the ranks a job launches which process launched them.
LAUNCHER_PID = "LIGHTNING_COMPRESS_LAUNCHER_PID"
#: ``prctl``'s option that sends the calling process a signal when its parent dies (``<linux/prctl.h>``).
_PR_SET_PDEATHSIG = 1


def launched_processes(trainer: L.Trainer) -> list[subprocess.Popen]:
    """The processes ``trainer``'s launcher started for the further ranks on this machine (none unless it
    launched them: a job's first DDP fit does, and those ranks run the whole job).

    Example:
        >>> launched_processes(L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False))
        []
    """
    return list(getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or [])


@contextlib.contextmanager
def job_processes() -> Iterator[list[subprocess.Popen]]:
    """Around the runs of a job, on every rank: collect into the yielded list the processes that the job's
    trainers launched; when the runs end, end the job's process group cleanly.

    - The runs succeeded: every rank meets at a barrier (no collective is still under way), the first waits
      for the ranks it launched to exit, each tearing its process group down while the first's is still up,
      and then destroys its own. A launched rank that does not exit in :data:`EXIT_TIMEOUT_S` is killed.
    - A run failed: the launched ranks are killed (they would wait for this one on a collective) and the
      process group is destroyed without a barrier, since another rank may be gone.

    Example:
        >>> with job_processes() as launched:  # without DDP there is no process group and nothing launched
        ...     launched
        []
    """
    launched: list[subprocess.Popen] = []
    distributed = torch.distributed.is_available()
    earlier_launcher = os.environ.get(LAUNCHER_PID)
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks launched now inherit it
    try:
        yield launched
    except BaseException:
        for process in launched:
            process.kill()
            process.wait()
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    finally:
        if earlier_launcher is None:
            del os.environ[LAUNCHER_PID]
        else:
            os.environ[LAUNCHER_PID] = earlier_launcher
    if distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
    for process in launched:
        try:
            process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(
                f"the DDP rank in process {process.pid} did not exit within {EXIT_TIMEOUT_S:.0f} s of the job's "
                "end, and was killed"
            ) from None
    if distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_with_launcher() -> None:
    """In a further rank of a DDP job (``LOCAL_RANK`` above 0), ask the kernel to kill this process when its
    parent, the rank that launched it, dies: without the launcher it would wait on a collective for ever. A
    launcher that died before this call (its pid in :data:`LAUNCHER_PID` is no longer the parent's) kills this
    process at once. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere, and in the first rank, nothing changes.

    Example:
        >>> exit_with_launcher()  # in a process that is no launched rank, nothing happens
    """
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 or not sys.platform.startswith("linux"):
        return
    parent = int(os.environ.get(LAUNCHER_PID) or os.getppid())
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}")
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
