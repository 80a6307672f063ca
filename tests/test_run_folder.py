from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightning.pytorch.utilities import rank_zero_only

from lightning_compress import run_folder
from lightning_compress.run_folder import LOCK_FILE, RunFolderError, claim_run_folder

# Forked, the holders start at once: a fresh interpreter would spend seconds importing Lightning.
FORK = multiprocessing.get_context("fork")
STARTED = "2026-01-01T00:00:00+00:00"


def assert_claim_refused(folder: Path, message: str) -> None:
    """A claim of ``folder`` fails with ``RunFolderError`` matching ``message``."""
    with pytest.raises(RunFolderError, match=message):
        with claim_run_folder(folder, enabled=True):
            pass


def _hold(folder: str) -> None:
    with claim_run_folder(folder, enabled=True):
        time.sleep(30)


def _read(lock: Path) -> dict | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return json.loads(lock.read_text())
    return None


@contextlib.contextmanager
def live_holder(folder: Path) -> Iterator[int]:
    """A process that claims ``folder`` and sleeps (30 s at most); yields its pid once its lock is written."""
    process = FORK.Process(target=_hold, args=(str(folder),), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 10
        while _read(folder / LOCK_FILE) is None:
            assert time.monotonic() < deadline, "the holder wrote no lock within 10 s"
            time.sleep(0.01)
        yield process.pid
    finally:
        process.kill()
        process.join(timeout=10)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=30, check=True
    )
    return int(finished.stdout)


def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    lock.write_text(
        json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": STARTED, "token": "earlier"})
    )
    return lock


def test_a_folder_that_a_live_run_holds_is_refused_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, lock = tmp_path / "run", tmp_path / "run" / LOCK_FILE
    with live_holder(folder) as pid:
        held = lock.read_text()
        message = (
            rf"^run folder {re.escape(str(folder))} is in use by pid {pid} \(started [^)]+\): wait for that run to end or choose "
            rf"another hydra\.run\.dir; if pid {pid} is no lightning-compress run, delete {re.escape(str(lock))}$"
        )
        monkeypatch.setattr(run_folder.time, "sleep", lambda seconds: pytest.fail("the claim waited for a live holder"))
        assert_claim_refused(folder, message)
        assert lock.read_text() == held  # the holder's lock is left as it was


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    pid = dead_pid()
    lock = write_lock(tmp_path, pid)
    message = rf"^run folder {re.escape(str(tmp_path))}: taking over the stale lock of pid {pid} \(started {re.escape(STARTED)}\), which is no longer running$"
    with pytest.warns(UserWarning, match=message), claim_run_folder(tmp_path, enabled=True):
        owner = json.loads(lock.read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
    assert not lock.exists()


def _race(
    folder: str,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue,
    release: multiprocessing.synchronize.Event,
) -> None:
    barrier.wait(timeout=10)
    try:
        with warnings.catch_warnings(), claim_run_folder(folder, enabled=True):
            warnings.simplefilter("ignore")
            results.put(("won", os.getpid()))
            release.wait(timeout=10)
    except RunFolderError as error:
        results.put(("refused", str(error)))


def test_of_processes_taking_over_a_stale_lock_at_once_one_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_lock = run_folder._read_lock

    def slow_read_lock(lock: Path) -> dict | None:  # each contender reads the stale lock before any replaces it
        owner = read_lock(lock)
        time.sleep(0.02)
        return owner

    monkeypatch.setattr(run_folder, "_read_lock", slow_read_lock)
    contenders = 4
    for attempt in range(2):
        folder = tmp_path / str(attempt)
        write_lock(folder, dead_pid())
        barrier, results, release = FORK.Barrier(contenders), FORK.Queue(), FORK.Event()
        processes = [
            FORK.Process(target=_race, args=(str(folder), barrier, results, release), daemon=True)
            for _ in range(contenders)
        ]
        try:
            for process in processes:
                process.start()
            outcomes = [results.get(timeout=10) for _ in processes]
            release.set()
        finally:
            for process in processes:
                process.join(timeout=10)
                process.kill()
        winners = [pid for kind, pid in outcomes if kind == "won"]
        assert len(winners) == 1, outcomes
        assert all(f"is in use by pid {winners[0]} " in text for kind, text in outcomes if kind == "refused"), outcomes


def test_a_process_that_read_the_stale_lock_late_leaves_the_winners_lock(tmp_path: Path) -> None:
    lock = write_lock(tmp_path, dead_pid())
    stale = json.loads(lock.read_text())
    winner = {**stale, "pid": os.getpid(), "token": "winner"}
    lock.write_text(json.dumps(winner))  # another process took it over after this one read it
    assert not run_folder._take_over(lock, stale, {**stale, "token": "late"})
    assert json.loads(lock.read_text()) == winner
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_takeover_under_way_is_waited_for_then_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_folder, "WAIT_S", 0.05)
    lock = write_lock(tmp_path, dead_pid())
    marker = tmp_path / f"{LOCK_FILE}.takeover"
    marker.touch()
    message = (
        rf"^run folder {re.escape(str(tmp_path))}: another process is taking over its stale lock {re.escape(str(lock))}; "
        rf"try again, or if none is, delete {re.escape(str(marker))}$"
    )
    assert_claim_refused(tmp_path, message)
    assert json.loads(lock.read_text())["token"] == "earlier"


def test_an_unreadable_lock_is_named_after_a_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_folder, "WAIT_S", 0.05)
    lock = tmp_path / LOCK_FILE
    lock.write_text("not json")
    message = (
        rf"^run folder {re.escape(str(tmp_path))}: its lock file {re.escape(str(lock))} is not a lightning-compress lock "
        rf"\(JSON with pid, host, started\); delete it if no run uses this folder$"
    )
    assert_claim_refused(tmp_path, message)


def test_a_lock_from_another_host_is_refused_naming_the_file(tmp_path: Path) -> None:
    lock = write_lock(tmp_path, 12345, host="elsewhere")
    message = (
        rf"^run folder {re.escape(str(tmp_path))} is locked by pid 12345 on host elsewhere \(started {re.escape(STARTED)}\), "
        rf"which this host cannot check: wait for that run to end or choose another hydra\.run\.dir; if that run is gone, delete {re.escape(str(lock))}$"
    )
    assert_claim_refused(tmp_path, message)
    assert json.loads(lock.read_text())["host"] == "elsewhere"


def test_the_lock_is_removed_when_the_block_ends_also_by_an_exception(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with claim_run_folder(folder, enabled=True) as claimed:
            assert claimed == folder and (folder / LOCK_FILE).is_file()
        assert not (folder / LOCK_FILE).exists()
        with pytest.raises(ValueError, match="^in the run$"), claim_run_folder(folder, enabled=True):
            raise ValueError("in the run")
        assert not (folder / LOCK_FILE).exists()


def test_a_lock_that_is_no_longer_ours_is_left_in_place(tmp_path: Path) -> None:
    with claim_run_folder(tmp_path, enabled=True):
        lock = write_lock(tmp_path, 12345, host="elsewhere")
    assert json.loads(lock.read_text())["host"] == "elsewhere"


def test_a_finished_folder_is_refused_unless_resuming_or_overwriting(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    message = (
        rf"^run folder {re.escape(str(tmp_path))} holds checkpoints/, report\.json from an earlier run: choose another hydra\.run\.dir, "
        rf"resume with ckpt_path={re.escape(str(tmp_path))}/checkpoints/last\.ckpt, or pass overwrite=true$"
    )
    assert_claim_refused(tmp_path, message)
    assert not (tmp_path / LOCK_FILE).exists()  # the refusal releases the lock
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with claim_run_folder(tmp_path, resuming=True, enabled=True):
            pass
    overwriting = rf"^run folder {re.escape(str(tmp_path))} holds checkpoints/, report\.json from an earlier run; removing its files"
    with pytest.warns(UserWarning, match=overwriting), claim_run_folder(tmp_path, overwrite=True, enabled=True):
        pass


def test_overwrite_leaves_the_folder_holding_only_what_the_new_run_writes(tmp_path: Path) -> None:
    """Before, the earlier run's last.ckpt stayed (the new one became last-v1.ckpt), and its runs and ONNX file."""
    earlier = ["report.json", "model.onnx", "checkpoints/last.ckpt", "dense/checkpoints/last.ckpt", "dense/report.json"]
    for name in [*earlier, ".hydra/config.yaml", "train.log"]:  # the last two: the new run's, written before its claim
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("earlier")
    with pytest.warns(UserWarning, match="removing its files"):
        with claim_run_folder(tmp_path, overwrite=True, enabled=True):
            held = sorted([".hydra", LOCK_FILE, run_folder.HELD_HYDRA, "train.log"])
            assert sorted(path.name for path in tmp_path.iterdir()) == held
    assert sorted(path.name for path in tmp_path.iterdir()) == [".hydra", "train.log"]


def test_a_run_refused_for_a_live_holder_puts_the_holder_s_hydra_files_back(tmp_path: Path) -> None:
    """Hydra writes a run's .hydra/ files before the application starts: the refused run wrote over the holder's."""
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("seed: 1\n")
    with live_holder(folder):
        deadline = time.monotonic() + 10
        while not (folder / run_folder.HELD_HYDRA / "config.yaml").exists():
            assert time.monotonic() < deadline, "the holder kept no copy of its .hydra files within 10 s"
            time.sleep(0.01)
        (folder / ".hydra" / "config.yaml").write_text("seed: 2\n")  # what the refused run's Hydra wrote
        assert_claim_refused(folder, "is in use by pid")
        assert (folder / ".hydra" / "config.yaml").read_text() == "seed: 1\n"


def test_a_job_claims_its_folder_before_it_sets_anything_up(
    compose_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run refused for a folder another run holds fails before building models and recipes (it took 23 s)."""
    from lightning_compress import job

    monkeypatch.setattr(job, "_check_runs_on_model", lambda *args: pytest.fail("set up before the claim"))
    with live_holder(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="is in use by pid"):
            job.train(compose_config(f"output_dir={tmp_path / 'run'}"))


def test_a_finished_job_with_runs_in_sub_folders_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dense" / "checkpoints").mkdir(parents=True)
    (tmp_path / "dense" / "report.json").write_text("{}")
    message = (
        rf"^run folder {re.escape(str(tmp_path))} holds dense/checkpoints/, dense/report\.json from an earlier run: choose another hydra\.run\.dir, "
        rf"resume with ckpt_path={re.escape(str(tmp_path))}/<last run>/checkpoints/last\.ckpt, or pass overwrite=true$"
    )
    assert_claim_refused(tmp_path, message)


def test_what_hydra_writes_first_does_not_count_as_a_finished_run(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (tmp_path / "train.log").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with claim_run_folder(tmp_path, enabled=True):
            pass


@pytest.mark.parametrize(("rank", "environment"), [(1, {}), (0, {"NODE_RANK": "1"}), (0, {"GROUP_RANK": "2"})])
def test_only_global_rank_zero_claims_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int, environment: dict[str, str]
) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    lock = write_lock(tmp_path, 12345, host="elsewhere")  # rank zero's lock, seen from another node
    (tmp_path / "report.json").write_text("{}")
    with claim_run_folder(tmp_path) as folder:
        assert folder == tmp_path
    assert json.loads(lock.read_text())["host"] == "elsewhere"


def test_global_rank_zero_claims_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    for key in ("NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    with claim_run_folder(tmp_path):
        assert (tmp_path / LOCK_FILE).is_file()
