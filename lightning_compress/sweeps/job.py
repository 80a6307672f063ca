"""One job of a Hydra sweep: its own command line for the DDP ranks it launches, a clean process for the next
job, the record of its failure, and of its success, so that the same sweep run again keeps what it finished (the
objectives an optimizing sweeper reads: :mod:`.objectives`)."""

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

from lightning_compress.analysis.report import Report
from lightning_compress.files import write_atomically

#: What a sweep job that finished records in its folder: the overrides it ran with.
FINISHED_FILE = "finished.json"


@contextlib.contextmanager
def one_job_of_a_sweep() -> Iterator[list[str] | None]:
    """In a sweep, let this job train with DDP as a run would, and leave the process clean for the next job.

    Lightning's DDP launcher starts each further rank with this process's command line plus
    ``hydra.run.dir``: in a sweep that command line is the whole sweep (``-m`` and every value), so each
    rank would run every job (Optuna's would even sample values of their own) in a folder of its own.
    Here the command line becomes this job's own overrides and the run folder this job's folder. When the
    job ends (its process group ended by :func:`~lightning_compress.distributed.job_processes`), the
    launcher's environment variables go, so that the next job starts processes of its own. Yields the job's
    overrides in a sweep, ``None`` outside one.
    """
    hydra_config = HydraConfig.get()
    if hydra_config.mode != RunMode.MULTIRUN:
        yield None
        return
    argv, environment = sys.argv, dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_config.overrides.task, "hydra.mode=RUN"]  # an hparams_search config sets MULTIRUN
    with read_write(hydra_config):
        hydra_config.run.dir = hydra_config.runtime.output_dir
    try:
        yield list(hydra_config.overrides.task)
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environment)


def record_finished(output_dir: str, overrides: list[str]) -> None:
    """Write :data:`FINISHED_FILE` (the job's overrides) into the job's folder: the same job run again is kept."""
    path = Path(output_dir) / FINISHED_FILE
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps({"overrides": overrides}) + "\n"))


def finished_report(output_dir: str, overrides: list[str]) -> Report | None:
    """The report of a job that finished in ``output_dir`` with the same ``overrides``, else ``None`` (never run,
    interrupted, failed, or run with other overrides: an optimizing sweeper samples anew).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> record_finished(folder, ["seed=1"])
        >>> _ = (Path(folder) / "report.json").write_text(json.dumps(Report().to_dict()))
        >>> finished_report(folder, ["seed=1"]) is not None, finished_report(folder, ["seed=2"])
        (True, None)
    """
    folder = Path(output_dir)
    try:
        recorded = json.loads((folder / FINISHED_FILE).read_text())
        report = json.loads((folder / "report.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    same = isinstance(recorded, dict) and recorded.get("overrides") == overrides
    return Report.from_dict(report) if same else None


def record_failure(output_dir: str, error: BaseException) -> None:
    """Write ``failure.json`` (type, message, traceback) into the run folder, where a sweep summary finds it."""
    failure = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    path = Path(output_dir) / "failure.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(failure, indent=2) + "\n"))
