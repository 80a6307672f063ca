"""What the library reads from a batch: its inputs, its targets, and the first training batch's inputs of a fit.

A batch is ``(inputs, targets, ...)``, or a dict in Hugging Face's convention: ``input_ids``, optionally
``attention_mask`` (and ``token_type_ids``), and ``labels``, where every key but ``labels`` is a keyword
argument of the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

#: A batch: ``(inputs, targets, ...)`` or a dict of tensors in Hugging Face's convention.
Batch = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
#: What a model is called with: one tensor (positionally) or tensors by keyword (a dict batch minus its labels).
ModelInputs = torch.Tensor | dict[str, torch.Tensor]
#: The key of a dict batch's targets, which the model is not given.
LABELS = "labels"
#: The target of a sample without a label (Hugging Face's and ``F.cross_entropy``'s ``ignore_index``): the
#: task loss and accuracy leave it out, distillation learns it from the teacher alone.
UNLABELED = -100


def batch_inputs(batch: Any) -> torch.Tensor:
    """The inputs of ``batch``: the batch itself when it is a tensor, a dict batch's ``input_ids``, else its first
    item (``(inputs, targets)``).

    Example:
        >>> batch_inputs((torch.zeros(2, 3), torch.tensor([0, 1]))).shape
        torch.Size([2, 3])
        >>> batch_inputs({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([0, 1])}).shape
        torch.Size([2, 5])
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return _required(batch, "input_ids")
    return batch[0]


def model_inputs(batch: Batch) -> ModelInputs:
    """What the model is called with for ``batch``: a dict batch's tensors but its ``labels``, by keyword, else the
    batch's first item (see :func:`call_model`).

    Example:
        >>> ids, labels = torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 1])
        >>> sorted(model_inputs({"input_ids": ids, "attention_mask": ids, "labels": labels}))
        ['attention_mask', 'input_ids']
        >>> model_inputs((ids, labels)) is ids
        True
    """
    if not isinstance(batch, Mapping):
        return batch_inputs(batch)
    _required(batch, "input_ids")
    return {key: value for key, value in batch.items() if key != LABELS}


def batch_targets(batch: Batch) -> torch.Tensor:
    """The targets of ``batch``: a dict batch's ``labels``, else its second item.

    Example:
        >>> batch_targets({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([0, 1])})
        tensor([0, 1])
    """
    return _required(batch, LABELS) if isinstance(batch, Mapping) else batch[1]


def call_model(model: torch.nn.Module, inputs: ModelInputs) -> Any:
    """``model(**inputs)`` for inputs by keyword (a dict batch's), ``model(inputs)`` for one tensor.

    Example:
        >>> call_model(torch.nn.Identity(), torch.zeros(2)).shape
        torch.Size([2])
    """
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def placed_like(inputs: ModelInputs, device: torch.device, dtype: torch.dtype) -> ModelInputs:
    """``inputs`` (a tensor, or tensors by keyword) on ``device``, floats in ``dtype`` (a model's), integers such as
    token ids as they are.

    Example:
        >>> placed_like(torch.tensor([[3, 1]]), torch.device("cpu"), torch.float16).dtype
        torch.int64
        >>> placed_like({"input_ids": torch.tensor([[3, 1]])}, torch.device("cpu"), torch.float16)["input_ids"].dtype
        torch.int64
    """
    if isinstance(inputs, Mapping):
        return {key: placed_like(value, device, dtype) for key, value in inputs.items()}
    return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)


def first_training_input(trainer: L.Trainer) -> torch.Tensor | None:
    """The inputs of the first batch of ``trainer``'s datamodule's ``train_dataloader()`` (a dict batch's
    ``input_ids``); ``None`` without a datamodule (dataloaders given to ``fit`` directly are not built until
    training starts)."""
    if trainer.datamodule is None:
        return None
    inputs = batch_inputs(next(iter(trainer.datamodule.train_dataloader())))
    return inputs if isinstance(inputs, torch.Tensor) else None


def _required(batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in batch:
        raise ValueError(
            f"a dict batch needs {key!r} (Hugging Face's convention: input_ids, attention_mask, labels), "
            f"got the keys {sorted(batch)}"
        )
    return batch[key]
