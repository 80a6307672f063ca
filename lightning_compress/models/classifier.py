"""A LightningModule that trains any ``nn.Module`` classifier with cross-entropy and reports accuracy."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import IO, Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import Self

from lightning_compress.batches import UNLABELED, Batch, batch_targets, call_model, model_inputs, output_logits
from lightning_compress.safe_loading import refusal

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class ClassificationModule(L.LightningModule):
    """Wraps a classifier: cross-entropy loss, top-1 accuracy (torchmetrics) for train, val and test.

    ``optimizer`` and ``scheduler`` are factories (``functools.partial`` or Hydra ``_partial_: true``),
    called with the parameters and the optimizer in :meth:`configure_optimizers`. ``input_shape`` and
    ``input_dtype`` (``"int64"`` for token ids) make the ``example_input_array`` that export and the
    report use. A batch is ``(inputs, targets)`` or a dict in Hugging Face's convention (``input_ids``,
    ``attention_mask``, ``labels``), whose tensors but ``labels`` are the model's keyword arguments; the model may
    return its logits or a Hugging Face ``ModelOutput`` (``AutoModelForSequenceClassification``), whose ``logits``
    the module returns; a target of
    :data:`~lightning_compress.batches.UNLABELED` (-100) marks a sample without a label, which the loss and
    accuracy leave out (:class:`~lightning_compress.DistillationModule` learns it from the teacher). Logged metrics:
    ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.
    The checkpoint stores the wrapped model's weights under ``model.``; load it back with
    ``ClassificationModule.load_from_checkpoint(path, model=SmallCNN(...))``, which reads it with
    ``weights_only=True``: no code in a planted file runs.

    Example:
        >>> from lightning_compress.models import SmallCNN
        >>> module = ClassificationModule(SmallCNN(num_classes=10, image_size=8), num_classes=10, input_shape=(1, 8, 8))
        >>> module(module.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        input_shape: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
        input_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        # Plain ints, so the hyperparameters in a checkpoint load with torch.load(weights_only=True).
        input_shape = None if input_shape is None else [int(size) for size in input_shape]
        dtype = getattr(torch, str(input_dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"input_dtype must name a torch dtype ('float32', 'int64' for token ids), got {input_dtype!r}"
            )
        self.save_hyperparameters("num_classes", "input_shape", "label_smoothing", "input_dtype", logger=False)
        self.model = model
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory = scheduler
        self.label_smoothing = label_smoothing
        if input_shape is not None:
            self.example_input_array = example_input(input_shape, dtype)
        self.train_accuracy, self.val_accuracy, self.test_accuracy = (
            MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=UNLABELED) for _ in range(3)
        )

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str] | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint`` with ``weights_only=True`` by default, local and ``http(s)`` paths
        alike (Lightning's own default loads remote files with ``weights_only=False``): no code runs from the file,
        and a file that would run some raises ``ValueError`` saying which global it refers to."""
        try:
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only=weights_only, **kwargs
            )
        except pickle.UnpicklingError as error:
            raise ValueError(f"checkpoint_path={str(checkpoint_path)!r}: {refusal(error)}") from None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped model's logits (of a Hugging Face ``ModelOutput`` too, see :func:`~lightning_compress.batches.output_logits`)."""
        return output_logits(self.model(*args, **kwargs))

    def _step(self, batch: Batch, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        logits, targets = call_model(self, model_inputs(batch)), batch_targets(batch)
        loss = labelled_cross_entropy(logits, targets, self.label_smoothing)
        accuracy(logits, targets)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_accuracy)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val", self.val_accuracy)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "test", self.test_accuracy)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }


def labelled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the samples with a label (a target other than
    :data:`~lightning_compress.batches.UNLABELED`), their mean; 0 for a batch without any, where the mean of
    ``F.cross_entropy`` is NaN. No device-to-host copy: the training step does not wait on the GPU.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> round(labelled_cross_entropy(logits, torch.tensor([0, UNLABELED])).item(), 4)
        0.1269
        >>> labelled_cross_entropy(logits, torch.tensor([UNLABELED, UNLABELED])).item()
        0.0
    """
    total = F.cross_entropy(logits, targets, ignore_index=UNLABELED, reduction="sum", label_smoothing=label_smoothing)
    return total / (targets != UNLABELED).sum().clamp_min(1)


def example_input(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """One input of ``shape``: zeros, or for integer dtypes token ids of 1, a real token (ids of 0 would be all
    padding).

    Example:
        >>> example_input([4], torch.int64)
        tensor([[1, 1, 1, 1]])
    """
    return torch.full((1, *shape), 0 if dtype.is_floating_point else 1, dtype=dtype)
