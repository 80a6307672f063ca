"""What the library reads from a batch: its inputs, and the first training batch's inputs of a fit."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def batch_inputs(batch: Any) -> torch.Tensor:
    """The inputs of ``batch``: the batch itself when it is a tensor, else its first item (``(inputs, targets)``).

    Example:
        >>> batch_inputs((torch.zeros(2, 3), torch.tensor([0, 1]))).shape
        torch.Size([2, 3])
    """
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def placed_like(inputs: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``inputs`` on ``device``, floats in ``dtype`` (a model's), integers such as token ids as they are.

    Example:
        >>> placed_like(torch.tensor([[3, 1]]), torch.device("cpu"), torch.float16).dtype
        torch.int64
    """
    return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)


def first_training_input(trainer: L.Trainer) -> torch.Tensor | None:
    """The inputs of the first batch of ``trainer``'s datamodule's ``train_dataloader()``; ``None`` without a
    datamodule (dataloaders given to ``fit`` directly are not built until training starts)."""
    if trainer.datamodule is None:
        return None
    inputs = batch_inputs(next(iter(trainer.datamodule.train_dataloader())))
    return inputs if isinstance(inputs, torch.Tensor) else None
