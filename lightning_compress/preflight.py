"""Checks of a job's settings that pass before any of its runs trains, each naming the key, the value and
what is allowed: a job of four runs must not fail in its last run on a value it had from the start."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.fabric.utilities.cloud_io import _load as load_checkpoint_file
from omegaconf import DictConfig

from lightning_compress.arguments import is_int
from lightning_compress.safe_loading import refusal

#: Lightning's keys of a checkpoint that ``trainer.fit(ckpt_path=...)`` resumes from.
CHECKPOINT_KEYS = ("epoch", "global_step", "state_dict", "loops")


def _batches(value: Any, minimum: int) -> bool:
    """None (all batches), a whole number of batches >= ``minimum``, or a fraction of them (0 only with ``minimum=0``)."""
    if value is None:
        return True
    if is_int(value):
        return value >= minimum
    return isinstance(value, float) and (0.0 <= value <= 1.0 if minimum == 0 else 0.0 < value <= 1.0)


#: Trainer settings whose bad values Lightning accepts at construction and fails on (or trains forever,
#: or trains nothing) later: key -> (check, what is allowed).
TRAINER_SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_epochs": (lambda v: is_int(v) and v >= 1, "a whole number >= 1: the epochs each run trains"),
    "min_epochs": (lambda v: v is None or (is_int(v) and v >= 0), "null or a whole number >= 0"),
    "max_steps": (lambda v: is_int(v) and (v == -1 or v >= 1), "-1 (no limit) or a whole number >= 1"),
    "limit_train_batches": (
        lambda v: _batches(v, 1),
        "null (all), a number of batches >= 1 or a fraction in (0, 1]: 0 trains nothing",
    ),
    "limit_val_batches": (lambda v: _batches(v, 0), "null (all), a number of batches >= 0 or a fraction in [0, 1]"),
    "limit_test_batches": (lambda v: _batches(v, 0), "null (all), a number of batches >= 0 or a fraction in [0, 1]"),
    "fast_dev_run": (
        lambda v: isinstance(v, bool) or (is_int(v) and v >= 0),
        "true, false or a number of batches >= 0",
    ),
    "check_val_every_n_epoch": (lambda v: v is None or (is_int(v) and v >= 1), "null or a whole number >= 1"),
}


def check_settings(cfg: DictConfig, key_prefix: str = "") -> None:
    """``seed`` and the trainer settings that Lightning would take and fail on, or train forever or not at all;
    the messages name each key after ``key_prefix`` (``"teacher_run."`` for the teacher's run).

    Example:
        >>> from omegaconf import OmegaConf
        >>> check_settings(OmegaConf.create({"seed": 1, "trainer": {"max_epochs": 0}}))
        Traceback (most recent call last):
        ...
        ValueError: trainer.max_epochs=0 is not allowed: use a whole number >= 1: the epochs each run trains
    """
    seed = cfg.get("seed")
    if seed is not None and not (is_int(seed) and 0 <= seed < 2**32):
        raise ValueError(
            f"{key_prefix}seed={seed!r} is not allowed: use a whole number from 0 to 4294967295 (what numpy seeds), "
            "or null to leave randomness unseeded"
        )
    trainer = cfg.get("trainer") or {}
    for key, (allowed, description) in TRAINER_SETTINGS.items():
        if key in trainer and not allowed(trainer[key]):
            raise ValueError(f"{key_prefix}trainer.{key}={trainer[key]!r} is not allowed: use {description}")


def check_resume_checkpoint(path: str, module: L.LightningModule, max_epochs: int) -> None:
    """``ckpt_path`` is a Lightning checkpoint that loads with ``weights_only=True`` (no code runs from it),
    holds every weight of ``module`` in its shape, and leaves epochs to train within ``max_epochs``.

    Example:
        >>> import torch
        >>> check_resume_checkpoint("missing.ckpt", torch.nn.Linear(2, 2), max_epochs=3)
        Traceback (most recent call last):
        ...
        ValueError: ckpt_path='missing.ckpt': no such file; give the checkpoint of the run to resume, e.g. ckpt_path=<run folder>/checkpoints/last.ckpt
    """
    checkpoint = _read_checkpoint(path)
    missing = (
        [key for key in CHECKPOINT_KEYS if key not in checkpoint]
        if isinstance(checkpoint, Mapping)
        else list(CHECKPOINT_KEYS)
    )
    if missing:
        raise ValueError(f"ckpt_path={path!r} is not a checkpoint that Lightning's Trainer wrote: it lacks {missing}")
    saved, expected = checkpoint["state_dict"], module.state_dict()
    wrong = [
        f"{name} {tuple(tensor.shape)} (checkpoint: {tuple(saved[name].shape) if name in saved else 'missing'})"
        for name, tensor in expected.items()
        if name not in saved or saved[name].shape != tensor.shape
    ]
    unexpected = [name for name in saved if name not in expected]
    if wrong or unexpected:
        problems = (
            [f"{len(wrong)} of its tensors are missing or shaped otherwise: {', '.join(wrong[:3])}"] if wrong else []
        )
        problems += (
            [f"the checkpoint holds {len(unexpected)} tensors it lacks: {', '.join(unexpected[:3])}"]
            if unexpected
            else []
        )
        raise ValueError(
            f"ckpt_path={path!r} does not fit the model {type(getattr(module, 'model', module)).__name__}: {'; '.join(problems)}"
        )
    finished = _finished_epochs(checkpoint)
    if finished is not None and finished >= max_epochs:
        raise ValueError(
            f"ckpt_path={path!r} holds {finished} trained epochs and trainer.max_epochs={max_epochs} leaves none to "
            f"train: raise trainer.max_epochs above {finished} to train on"
        )


def _finished_epochs(checkpoint: Mapping[str, Any]) -> int | None:
    """The epochs whose training a checkpoint had finished (a resumed fit starts after them), if it says."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return None


def local_checkpoint(path: str, folder: Path) -> str:
    """``path`` made absolute (an fsspec address such as ``file://`` as it is), or for an ``http(s)://`` address the file downloaded to ``folder/resume-from.ckpt``
    (once: torch's hub cache would keep the first file of a name for every later address that ends in it). Only
    ``http://`` and ``https://`` are addresses: Lightning takes any path that starts with ``http`` (a folder
    ``httpx/``) for one, and would read a file of the same base name from torch's hub cache instead.

    Example:
        >>> local_checkpoint("outputs/run/checkpoints/last.ckpt", Path("outputs/new")) == os.path.abspath(
        ...     "outputs/run/checkpoints/last.ckpt"
        ... )
        True
        >>> local_checkpoint("file:///runs/run/checkpoints/last.ckpt", Path("outputs/new"))
        'file:///runs/run/checkpoints/last.ckpt'
    """
    if not path.startswith(("http://", "https://")):
        return path if "://" in path else os.path.abspath(path)  # file://, s3://...: fsspec's, as they are
    target = folder / "resume-from.ckpt"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(path, str(target), progress=False)
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise ValueError(f"ckpt_path={path!r} cannot be downloaded: {error}") from None
    return str(target)


def _read_checkpoint(path: str) -> Any:
    if "://" not in path and not Path(path).is_file():
        raise ValueError(
            f"ckpt_path={path!r}: no such file; give the checkpoint of the run to resume, e.g. ckpt_path=<run folder>/checkpoints/last.ckpt"
        )
    try:
        return load_checkpoint_file(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"ckpt_path={path!r}: {refusal(error)}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"ckpt_path={path!r} is not a checkpoint torch can read: {str(error).splitlines()[0]}"
        ) from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings and no Lightning info while a check builds what the runs build again (and say again)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def check_writable(folder: str | Path, key: str) -> None:
    """``folder`` exists or can be made, and a file can be written in it; else ``ValueError`` naming ``key``.

    Example:
        >>> check_writable("/dev/null/run", "hydra.run.dir")
        Traceback (most recent call last):
        ...
        ValueError: hydra.run.dir='/dev/null/run' cannot be written: Not a directory; choose a folder you can write
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"{key}={str(folder)!r} cannot be written: {error.strerror or error}; choose a folder you can write"
        ) from None


class CheckOutputFolder(Callback):
    """Hydra callback: the run folder (``hydra.run.dir``) or sweep folder (``hydra.sweep.dir``) can be written,
    checked before Hydra makes it, so a bad folder is one line naming the key instead of a traceback. It exits
    (``SystemExit``, status 1): Hydra turns any other exception of a callback into a warning and goes on.

    Example:
        >>> from omegaconf import OmegaConf
        >>> CheckOutputFolder().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": "/dev/null/run"}}}))
        Traceback (most recent call last):
        ...
        SystemExit: hydra.run.dir='/dev/null/run' cannot be written: Not a directory; choose a folder you can write
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, key: str) -> None:
        try:
            check_writable(folder, key)
        except ValueError as error:
            raise SystemExit(str(error)) from None
