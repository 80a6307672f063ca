"""The ``FiniteCheck`` callback: a run whose loss or weights stop being finite stops with a clear error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_compress.finiteness import non_finite_counts


class FiniteCheck(L.Callback):
    """Stop training at the first batch whose loss is NaN or infinite, and after the last training batch of
    an epoch whose weights are (before that epoch's validation and checkpoint), instead of training on and
    reporting a broken model as compressed.

    A loss of NaN (NaN in the inputs, a learning rate that diverges) makes every weight NaN within a step;
    such a model still has the size of the compressed one, and a pruning mask multiplies NaN into NaN,
    not zero. This callback raises ``FloatingPointError`` naming the epoch, the batch and the value, or
    the weights and how many of their elements are not finite. Under DDP the ranks decide on the loss
    together, so none is left waiting (the weights are the same on every rank). Leave it out of the
    Trainer to allow non-finite values (the app: ``~callbacks.finite_check``).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[FiniteCheck()])
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):  # manual optimization may return nothing
            finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss.detach()).all()), all=True)
            if not finite:
                raise FloatingPointError(
                    f"the training loss is {loss.item()} (or not finite on another process) at epoch {trainer.current_epoch}, "
                    f"batch {batch_idx}: training diverged or the inputs hold NaN or infinity; check the data and the "
                    "learning rate (FiniteCheck stops the run, leave it out to allow non-finite values)"
                )
        if trainer.is_last_batch:
            broken = non_finite_parameters(pl_module)
            if broken:
                raise FloatingPointError(
                    f"after the training batches of epoch {trainer.current_epoch}, {describe_non_finite(broken)} are NaN "
                    "or infinite: training diverged (FiniteCheck stops the run, leave it out to allow non-finite values)"
                )


def non_finite_parameters(model: nn.Module) -> dict[str, int]:
    """How many elements of each parameter of ``model`` are NaN or infinite, for the parameters that have any.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     layer.weight[0, 0] = float("nan")
        >>> non_finite_parameters(layer)
        {'weight': 1}
    """
    return non_finite_counts(dict(model.named_parameters()))


def describe_non_finite(broken: dict[str, int]) -> str:
    """``"15 parameter elements (12 of 'a.weight', 3 of 'b.bias')"``, naming at most three parameters."""
    parts = [f"{count} of {name!r}" for name, count in list(broken.items())[:3]]
    more = f" and {len(broken) - 3} more parameters" if len(broken) > 3 else ""
    return f"{sum(broken.values())} parameter elements ({', '.join(parts)}{more})"
