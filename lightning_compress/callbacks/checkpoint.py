"""The ``CompressionCheckpoint`` callback: ``last`` is the last epoch, ``best`` the best compressed one."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


@runtime_checkable
class CompressionStage(Protocol):
    """A callback whose compression changes the model until an epoch, e.g. :class:`~lightning_compress.Pruning`
    (its last pruning step) or :class:`~lightning_compress.QuantizationAwareTraining` (its last switch)."""

    def final_epoch(self) -> int:
        """The first epoch at whose end the model is in its final compressed state (set up for this fit)."""
        ...


class CompressionCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose ``last.ckpt`` is always the last epoch and whose ``best`` is compressed.

    Lightning's ``ModelCheckpoint`` writes ``last.ckpt`` only when it saves a top-k checkpoint, so with
    ``save_top_k=1`` and a monitored metric that stops improving, ``last.ckpt`` is some earlier epoch and
    resuming from it trains epochs again. And a "best validation accuracy" picks a dense epoch while the
    model is still being compressed: its accuracy is the uncompressed model's. Here:

    - ``last.ckpt`` (``save_last=True`` by default) is written at every save point, whatever the monitor says;
    - the top-k (``best_model_path``) ranks only the epochs at the final compression state: from the
      :meth:`~CompressionStage.final_epoch` of every compression callback in the Trainer on (after the
      last pruning step, with every quantization switch thrown). Without compression callbacks it ranks
      every epoch, as ``ModelCheckpoint`` does. A fit that ends before that epoch keeps no best
      checkpoint, and says so at its start (``fast_dev_run`` saves none anyway).

    Every argument is ``ModelCheckpoint``'s.

    Example:
        >>> import lightning as L
        >>> from lightning_compress import Pruning
        >>> checkpoint = CompressionCheckpoint(dirpath="checkpoints", monitor="val/acc", mode="max")
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, callbacks=[Pruning(amount=0.9, end_epoch=3), checkpoint])
        >>> checkpoint.save_last
        True
    """

    def __init__(self, *args: Any, save_last: bool | str | None = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self._final_epoch = 0
        self._last_saved_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stages = [callback for callback in trainer.callbacks if isinstance(callback, CompressionStage)]
        self._final_epoch = max((stage.final_epoch() for stage in stages), default=0)
        if not trainer.fast_dev_run and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self._final_epoch:
            rank_zero_warn(
                f"CompressionCheckpoint: the compression reaches its final state at epoch {self._final_epoch}, after "
                f"this fit's last epoch ({trainer.max_epochs - 1}): no best checkpoint is kept, last.ckpt is"
            )

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if trainer.current_epoch >= self._final_epoch:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        # ModelCheckpoint calls this again after each top-k save of the same step; write last.ckpt once.
        if self._last_saved_step != trainer.global_step:
            self._last_saved_step = trainer.global_step
            super()._save_last_checkpoint(trainer, monitor_candidates)
