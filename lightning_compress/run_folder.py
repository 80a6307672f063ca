"""One run per run folder: a lock file held while a run writes into its folder, and no new run into a
finished run's folder.

Two runs started with the same ``hydra.run.dir`` would otherwise both succeed and leave a folder whose
report, ONNX file and checkpoints come from different runs. :func:`claim_run_folder` makes the second one
fail at once while the first is alive, takes over the lock of a run that died (with a warning), and
refuses a new run into a folder that already holds an earlier run's ``report.json`` or ``checkpoints/``
unless the run resumes or overwrites (which empties the folder of the earlier run's files first). Locks are
checked with ``os.kill(pid, 0)``: POSIX systems only.

Hydra writes a run's ``.hydra/`` files before the application starts, so a run refused because another holds the
folder has already written over the holder's: the holder keeps a copy (:data:`HELD_HYDRA`) while it runs, and a
refused run puts it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

#: The lock file a run holds in its folder: JSON with the owner's ``pid``, ``host``, ``started`` time and a ``token``.
LOCK_FILE = ".lightning-compress.lock"
#: What an earlier run leaves in its folder, or in the folder of each run of a job (``dense/``, ``pruning/``, ...).
EARLIER_RUN_OUTPUTS = ("report.json", "checkpoints")
#: How long a claim waits for a lock file being written, or for another process taking over a stale lock.
WAIT_S = 1.0
#: Where the holder of a folder keeps a copy of its ``.hydra/`` files while it runs (see the module).
HELD_HYDRA = ".lightning-compress.hydra"
#: What a run writes before it claims its folder (Hydra's), and so what ``overwrite`` leaves.
WRITTEN_BEFORE_THE_CLAIM = (".hydra",)


class RunFolderError(RuntimeError):
    """A run folder that this run must not write into: another run holds it, or an earlier run finished in it.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as parent, claim_run_folder(parent, enabled=True):
        ...     with claim_run_folder(parent, enabled=True):  # doctest: +ELLIPSIS
        ...         pass
        Traceback (most recent call last):
        ...
        lightning_compress.run_folder.RunFolderError: run folder ... is in use by pid ... (started ...): wait for ...
    """


@contextlib.contextmanager
def claim_run_folder(
    path: str | os.PathLike[str], *, resuming: bool = False, overwrite: bool = False, enabled: bool | None = None
) -> Iterator[Path]:
    """Hold the run folder ``path`` (created if needed) for the ``with`` block: yields it as an absolute path.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as parent:
        ...     with claim_run_folder(f"{parent}/run", enabled=True) as folder:
        ...         print(sorted(p.name for p in folder.iterdir()))
        ...     print(sorted(p.name for p in folder.iterdir()))
        ['.lightning-compress.lock']
        []

    The claim creates :data:`LOCK_FILE` in the folder atomically (``O_CREAT | O_EXCL``) and removes it when
    the block ends, normally or by an exception, if the lock is still this process's. A lock of a live
    process on this host raises :class:`RunFolderError` at once; a lock whose process has ended on this
    host is taken over with a warning (of two processes taking it over at once, one wins, the other sees
    the winner's lock); a lock from another host, whose process cannot be checked, raises, naming the lock
    file to delete if that run is gone. Holding the lock, the claim refuses a folder with an earlier run's
    outputs (:data:`EARLIER_RUN_OUTPUTS`, in the folder or in a sub-folder: Hydra's ``.hydra/`` and log
    files do not count) unless ``resuming`` (the run resumes from a checkpoint) or ``overwrite`` (warned: the
    earlier run's files are removed, :func:`clear_earlier_run`). While it holds the folder, the run keeps a copy
    of its ``.hydra/`` files, which a run refused for it puts back.

    Only global rank 0 claims: Lightning starts the DDP ranks > 0 with the same command line into the same
    folder, and there the block runs without a lock or a check. ``enabled`` makes that decision: ``None``
    (the default) claims when ``lightning.pytorch.utilities.rank_zero_only.rank == 0`` and the node rank
    (``NODE_RANK`` or ``GROUP_RANK``, where set) is 0; ``True`` or ``False`` overrides it.
    """
    folder = Path(path).absolute()
    if not (is_global_zero() if enabled is None else enabled):
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    mine = _acquire(folder, lock)
    held = folder / HELD_HYDRA
    try:
        _check_earlier_run(folder, resuming=resuming, overwrite=overwrite)
        if (folder / ".hydra").is_dir():
            shutil.copytree(folder / ".hydra", held, dirs_exist_ok=True)
        yield folder
    finally:
        if _read_lock(lock) == mine:
            shutil.rmtree(held, ignore_errors=True)
            lock.unlink(missing_ok=True)


def is_global_zero() -> bool:
    """Whether this process is global rank 0, before any trainer exists: by Lightning's rank from the
    environment (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``, ...) and the node rank, where set."""
    return rank_zero_only.rank == 0 and all(os.environ.get(key, "0") == "0" for key in ("NODE_RANK", "GROUP_RANK"))


def _acquire(folder: Path, lock: Path) -> dict[str, Any]:
    """Create ``lock`` with this process as its owner, or take over a stale one; returns the lock's content."""
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            try:
                with os.fdopen(handle, "w") as file:
                    file.write(json.dumps(mine) + "\n")
            except BaseException:
                lock.unlink()
                raise
            return mine
        owner = _read_lock(lock)  # None: released just now, or its owner has not written it yet
        if owner is not None:
            _refuse_live_owner(folder, lock, owner)
            if _take_over(lock, owner, mine):
                rank_zero_warn(
                    f"run folder {folder}: taking over the stale lock of pid {owner['pid']} (started {owner['started']}), which is no longer running"
                )
                return mine
        if time.monotonic() > deadline:
            marker = _marker(lock)
            if marker.exists():
                raise RunFolderError(
                    f"run folder {folder}: another process is taking over its stale lock {lock}; try again, or if none is, delete {marker}"
                )
            raise RunFolderError(
                f"run folder {folder}: its lock file {lock} is not a lightning-compress lock (JSON with pid, host, started); delete it if no run uses this folder"
            )
        time.sleep(0.01)


def _read_lock(lock: Path) -> dict[str, Any] | None:
    """The lock's content, or ``None`` when there is no lock or it is not (yet) a whole one."""
    try:
        owner = json.loads(lock.read_text())
    except (FileNotFoundError, ValueError):
        return None
    valid = (
        isinstance(owner, dict)
        and isinstance(owner.get("pid"), int)
        and owner["pid"] > 0
        and all(isinstance(owner.get(key), str) for key in ("host", "started"))
    )
    return owner if valid else None


def _refuse_live_owner(folder: Path, lock: Path, owner: dict[str, Any]) -> None:
    """Raise unless ``owner``'s process is known to have ended: it runs on this host, or on another one."""
    pid, started = owner["pid"], owner["started"]
    if owner["host"] != socket.gethostname():
        _give_back_hydra_files(folder)
        raise RunFolderError(
            f"run folder {folder} is locked by pid {pid} on host {owner['host']} (started {started}), which this host cannot check: "
            f"wait for that run to end or choose another hydra.run.dir; if that run is gone, delete {lock}"
        )
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:  # alive, under another user
        pass
    _give_back_hydra_files(folder)
    raise RunFolderError(
        f"run folder {folder} is in use by pid {pid} (started {started}): wait for that run to end or choose another "
        f"hydra.run.dir; if pid {pid} is no lightning-compress run, delete {lock}"
    )


def _give_back_hydra_files(folder: Path) -> None:
    """Put the holder's ``.hydra/`` files back where this refused run's Hydra wrote over them."""
    held = folder / HELD_HYDRA
    if held.is_dir():
        shutil.copytree(held, folder / ".hydra", dirs_exist_ok=True)


def _marker(lock: Path) -> Path:
    """The file whose exclusive creation lets one process at a time replace a stale ``lock``."""
    return lock.with_name(f"{lock.name}.takeover")


def _take_over(lock: Path, stale: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Replace ``lock`` by ``mine`` if it still holds ``stale``; ``False`` when another process takes it over.

    Only the holder of the marker, created with ``O_EXCL``, replaces a lock, and only after reading the
    stale content again under it: a process that read the same stale lock but gets the marker later finds
    the winner's lock instead, and leaves it.
    """
    marker, draft = _marker(lock), lock.with_name(f"{lock.name}.{mine['token']}")
    draft.write_text(json.dumps(mine) + "\n")
    try:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        try:
            if _read_lock(lock) != stale:
                return False
            os.replace(draft, lock)
            return True
        finally:
            marker.unlink()
    finally:
        draft.unlink(missing_ok=True)


def clear_earlier_run(folder: Path) -> None:
    """Remove everything an earlier run left in ``folder``, but the lock and what this run wrote before its claim.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in ("report.json", "model.onnx", ".hydra/config.yaml", "dense/checkpoints/last.ckpt"):
        ...     (folder / name).parent.mkdir(parents=True, exist_ok=True)
        ...     _ = (folder / name).write_text("earlier")
        >>> clear_earlier_run(folder)
        >>> sorted(path.name for path in folder.iterdir())
        ['.hydra']
    """
    for entry in folder.iterdir():
        if entry.name.startswith(LOCK_FILE) or entry.name in WRITTEN_BEFORE_THE_CLAIM or entry.suffix == ".log":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _check_earlier_run(folder: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse a folder with an earlier run's outputs, unless this run resumes, or overwrites them (warned)."""
    folders = [folder, *sorted(sub for sub in folder.iterdir() if sub.is_dir() and not sub.name.startswith("."))]
    found = [sub / name for sub in folders for name in EARLIER_RUN_OUTPUTS if (sub / name).exists()]
    if not found or resuming:
        return
    names = sorted(path.relative_to(folder).as_posix() + ("/" if path.is_dir() else "") for path in found)
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if overwrite:
        rank_zero_warn(
            f"run folder {folder} holds {listed} from an earlier run; removing its files (overwrite=true, or a sweep "
            "job run again that has no checkpoint to resume)"
        )
        clear_earlier_run(folder)
        return
    in_runs = not (folder / "checkpoints").exists() and any(
        path.name == "checkpoints" for path in found
    )  # a job's runs
    run = "<last run>/" if in_runs else ""
    raise RunFolderError(
        f"run folder {folder} holds {listed} from an earlier run: choose another hydra.run.dir, "
        f"resume with ckpt_path={folder}/{run}checkpoints/last.ckpt, or pass overwrite=true"
    )
