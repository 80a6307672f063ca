"""One job of a Hydra sweep: its own command line for the DDP ranks it launches, a clean process for the next
job, and the record of its failure (the objectives an optimizing sweeper reads: :mod:`.objectives`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

from lightning_compress.files import write_atomically


@contextlib.contextmanager
def one_job_of_a_sweep() -> Iterator[None]:
    """In a sweep, let this job train with DDP as a run would, and leave the process clean for the next job.

    Lightning's DDP launcher starts each further rank with this process's command line plus
    ``hydra.run.dir``: in a sweep that command line is the whole sweep (``-m`` and every value), so each
    rank would run every job (Optuna's would even sample values of their own) in a folder of its own.
    Here the command line becomes this job's own overrides and the run folder this job's folder. When the
    job ends (its process group ended by :func:`~lightning_compress.distributed.job_processes`), the
    launcher's environment variables go, so that the next job starts processes of its own.
    """
    hydra_config = HydraConfig.get()
    if hydra_config.mode != RunMode.MULTIRUN:
        yield
        return
    argv, environment = sys.argv, dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_config.overrides.task, "hydra.mode=RUN"]  # an hparams_search config sets MULTIRUN
    with read_write(hydra_config):
        hydra_config.run.dir = hydra_config.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environment)


def record_failure(output_dir: str, error: BaseException) -> None:
    """Write ``failure.json`` (type, message, traceback) into the run folder, where a sweep summary finds it."""
    failure = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    path = Path(output_dir) / "failure.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(failure, indent=2) + "\n"))
