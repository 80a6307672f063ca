"""What the benchmark scripts share: timing callbacks and writing results as JSON plus a Markdown table."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

RESULTS = Path(__file__).parent / "results"


class StepTimer(L.Callback):
    """Wall time between consecutive training batch starts (data, forward, backward, step, every callback),
    from epoch ``from_epoch`` on; the median of ``intervals`` is a run's step time."""

    def __init__(self, from_epoch: int = 0) -> None:
        self.from_epoch = from_epoch
        self.intervals: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch >= self.from_epoch:
            self.intervals.append(now - self._last)
        self._last = now


class EpochTimer(L.Callback):
    """Wall time of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def cpu_trainer(max_epochs: int, callbacks: list[L.Callback], **options: Any) -> L.Trainer:
    """A quiet single-process CPU ``Trainer`` (no logger, checkpoints, progress bar or model summary);
    ``options`` go to the ``Trainer`` as they are."""
    return L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **options,
    )


def cpu_description() -> dict[str, Any]:
    """This machine's CPU model and whether it has VNNI, which decides how ONNX Runtime's int8 kernels accumulate."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {
        "model": names[0] if names else platform.processor(),
        "vnni": any(flag in ("avx512_vnni", "avx_vnni") for flag in flags),
    }


def write_results(name: str, settings: dict, results: dict, markdown: str) -> None:
    """``results/<name>.json`` (the settings, torch's version and the results) and ``results/<name>.md``; prints the table."""
    RESULTS.mkdir(exist_ok=True)
    payload = {**settings, "torch": str(torch.__version__), **results}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
