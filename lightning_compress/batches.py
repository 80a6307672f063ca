"""What the library reads from a batch (its inputs, its targets, the first training batch's inputs of a fit) and
from a model's output (its logits).

A batch is ``(inputs, targets, ...)``, or a dict in Hugging Face's convention: ``input_ids``, optionally
``attention_mask`` (and ``token_type_ids``), and ``labels``, where every key but ``labels`` is a keyword
argument of the model. A model's output is its logits, or holds them as Hugging Face's models do
(``SequenceClassifierOutput.logits``) or as the first item of a tuple.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch

#: A batch: ``(inputs, targets, ...)`` or a dict of tensors in Hugging Face's convention.
Batch = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
#: What a model is called with: one tensor, a tuple of tensors (positionally), or tensors by keyword (a dict batch
#: minus its labels).
ModelInputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
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
    """``model(**inputs)`` for inputs by keyword (a dict batch's), ``model(*inputs)`` for a tuple, ``model(inputs)``
    for one tensor.

    Example:
        >>> call_model(torch.nn.Identity(), torch.zeros(2)).shape
        torch.Size([2])
        >>> call_model(torch.nn.Bilinear(2, 3, 1), (torch.zeros(4, 2), torch.zeros(4, 3))).shape
        torch.Size([4, 1])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def output_logits(output: Any) -> torch.Tensor:
    """The logits in a model's ``output``: the output itself when it is a tensor, the ``logits`` of a Hugging Face
    ``ModelOutput`` or of a dict, the first item of a tuple or list (``return_dict=False``).

    Example:
        >>> from transformers.modeling_outputs import SequenceClassifierOutput
        >>> output_logits(SequenceClassifierOutput(logits=torch.zeros(2, 3))).shape
        torch.Size([2, 3])
        >>> output_logits((torch.zeros(2, 3), torch.ones(2, 5, 8))).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
    elif isinstance(output, (tuple, list)) and output:
        logits = output[0]
    else:
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        keys = f" with the keys {sorted(output)}" if isinstance(output, Mapping) else ""
        raise TypeError(
            f"cannot read logits from a model output of type {type(output).__name__}{keys}: a model returns a tensor "
            "of logits, a Hugging Face ModelOutput or dict with 'logits', or a tuple whose first item is the logits"
        )
    return logits


def input_tensors(inputs: ModelInputs) -> list[torch.Tensor]:
    """The tensors of ``inputs``, in order: one tensor, a tuple's, or the values of tensors by keyword.

    Example:
        >>> [tuple(t.shape) for t in input_tensors({"input_ids": torch.ones(2, 5), "attention_mask": torch.ones(2, 5)})]
        [(2, 5), (2, 5)]
    """
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs) if isinstance(inputs, tuple) else [inputs]


def describe_inputs(inputs: ModelInputs) -> str:
    """The shapes of ``inputs``, for messages: ``(2, 5)``, ``(2, 5), (2, 3)`` or ``input_ids (2, 5), attention_mask (2, 5)``.

    Example:
        >>> describe_inputs({"input_ids": torch.ones(2, 5), "attention_mask": torch.ones(2, 5)})
        'input_ids (2, 5), attention_mask (2, 5)'
    """
    if isinstance(inputs, Mapping):
        return ", ".join(f"{key} {tuple(value.shape)}" for key, value in inputs.items())
    return ", ".join(str(tuple(tensor.shape)) for tensor in input_tensors(inputs))


def map_inputs(inputs: ModelInputs, function: Callable[[torch.Tensor], torch.Tensor]) -> ModelInputs:
    """``inputs`` with ``function`` applied to each of its tensors, in the same form (a tensor, a tuple, a dict).

    Example:
        >>> map_inputs({"input_ids": torch.ones(4, 5), "attention_mask": torch.ones(4, 5)}, lambda t: t[:1])["input_ids"].shape
        torch.Size([1, 5])
    """
    if isinstance(inputs, Mapping):
        return {key: function(value) for key, value in inputs.items()}
    return tuple(function(value) for value in inputs) if isinstance(inputs, tuple) else function(inputs)


def placed_like(inputs: ModelInputs, device: torch.device, dtype: torch.dtype) -> ModelInputs:
    """``inputs`` (a tensor, a tuple of them, or tensors by keyword) on ``device``, floats in ``dtype`` (a model's),
    integers such as token ids as they are.

    Example:
        >>> placed_like(torch.tensor([[3, 1]]), torch.device("cpu"), torch.float16).dtype
        torch.int64
        >>> placed_like({"input_ids": torch.tensor([[3, 1]])}, torch.device("cpu"), torch.float16)["input_ids"].dtype
        torch.int64
    """
    return map_inputs(
        inputs, lambda tensor: tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    )


def first_training_input(trainer: L.Trainer) -> ModelInputs | None:
    """What the model is called with for the first batch of the training dataloader of ``trainer``'s fit (see
    :func:`model_inputs`); ``None`` where :func:`training_inputs` finds no dataloader."""
    return next(iter(training_inputs(trainer, 1)), None)


def training_inputs(trainer: L.Trainer, count: int) -> list[ModelInputs]:
    """What the model is called with for the first ``count`` batches of the training dataloader of ``trainer``'s fit
    (see :func:`model_inputs`): a datamodule's, the LightningModule's ``train_dataloader()``, or the dataloader given to
    ``fit`` itself; none outside a fit and for several training dataloaders (a batch of each).

    Lightning builds the training dataloader when training starts, after the ``setup`` hooks; this asks the fit
    loop's source of it (its ``_data_source``, the one private name) for the dataloader, as the loop will.
    """
    source = trainer.fit_loop._data_source
    if source.instance is None or not source.is_defined():
        return []
    loader = source.dataloader()
    if isinstance(loader, (Mapping, Sequence)) or not isinstance(loader, Iterable):
        return []
    return [model_inputs(batch) for _, batch in zip(range(count), loader)]


def _required(batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in batch:
        raise ValueError(
            f"a dict batch needs {key!r} (Hugging Face's convention: input_ids, attention_mask, labels), "
            f"got the keys {sorted(batch)}"
        )
    return batch[key]
