"""Training the small CNN on the bundled digits, shared by the tests of callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.optim import Optimizer

from lightning_compress import ClassificationModule
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import SmallCNN


def digits_module(optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] | None = None) -> ClassificationModule:
    return ClassificationModule(
        SmallCNN(num_classes=10, image_size=8), num_classes=10, input_shape=(1, 8, 8), optimizer=optimizer
    )


def quiet_trainer(tmp_path, callbacks: list[L.Callback], max_epochs: int = 2, **options: Any) -> L.Trainer:
    """A CPU ``Trainer`` without logger, progress bar or model summary; ``options`` go to it as they are."""
    return L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **{"logger": False, **options},
    )


def fit_digits(
    tmp_path,
    callbacks: list[L.Callback],
    max_epochs: int = 1,
    ckpt_path: str | None = None,
    optimizer: Callable[[Iterable[nn.Parameter]], Optimizer] | None = None,
    logger: Logger | bool = False,
    seed: int = 0,
) -> tuple[L.Trainer, ClassificationModule, DigitsDataModule]:
    """Seeded fit on the CPU; checkpoints only where a ``ModelCheckpoint`` is given."""
    L.seed_everything(seed)
    module = digits_module(optimizer)
    trainer = quiet_trainer(
        tmp_path,
        callbacks,
        max_epochs,
        logger=logger,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    datamodule = DigitsDataModule()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module, datamodule


def straight_and_resumed(
    tmp_path, make_callback: Callable[[], L.Callback], max_epochs: int, stop_epochs: int = 2
) -> tuple[tuple[L.Callback, ClassificationModule], tuple[L.Callback, ClassificationModule]]:
    """The same seeded fit run straight to ``max_epochs``, and stopped after ``stop_epochs`` then resumed from
    its ``last.ckpt``: the callback and the module of each, ``(straight, whole), (resumed, continued)``."""
    straight = make_callback()
    _, whole, _ = fit_digits(tmp_path / "a", [straight], max_epochs=max_epochs)
    fit_digits(
        tmp_path / "b",
        [make_callback(), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)],
        max_epochs=stop_epochs,
    )
    resumed = make_callback()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    _, continued, _ = fit_digits(
        tmp_path / "b", [resumed, checkpoint], max_epochs=max_epochs, ckpt_path=str(tmp_path / "b" / "last.ckpt")
    )
    return (straight, whole), (resumed, continued)
