"""LightningDataModules over tensors held in memory: the loaders of their splits (seeded, sharded under DDP),
and for images the split and normalization in one place."""

from __future__ import annotations

from abc import ABC, abstractmethod

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


class TensorSplitsDataModule(L.LightningDataModule):
    """The ``"train"``, ``"val"`` and ``"test"`` :class:`TensorDataset` splits a subclass's ``setup`` fills, and
    their loaders: the training batches in an order that depends on ``seed`` and the epoch number alone
    (Lightning calls the sampler's ``set_epoch``), not on the global random state, so a run resumed from
    a checkpoint sees the same batches as one that never stopped; under distributed training each process
    gets its own shard of every epoch.

    Example:
        >>> datamodule = TensorSplitsDataModule(batch_size=2)
        >>> datamodule.splits = {"train": TensorDataset(torch.arange(4), torch.zeros(4))}
        >>> [len(inputs) for inputs, _ in datamodule.train_dataloader()]
        [2, 2]
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        #: The ``"train"``, ``"val"`` and ``"test"`` datasets, filled by :meth:`setup`.
        self.splits: dict[str, TensorDataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for the {split} dataloader")
        dataset = self.splits[split]
        sampler = None
        if shuffle:
            # Lightning keeps a DistributedSampler as it is and calls its set_epoch; with one replica it is
            # a shuffle seeded by (seed, epoch), with several it also shards.
            trainer = self.trainer
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class InMemoryImageDataModule(TensorSplitsDataModule, ABC):
    """Subclasses load ``(train_x, train_y, test_x, test_y)``; this class does the rest.

    Images are float tensors ``(N, C, H, W)``, labels int64. ``seed`` picks the fraction of the training
    images that becomes the validation set, and the order of the training batches (see
    :class:`TensorSplitsDataModule`). Every split is
    normalized per channel with the training split's mean and standard deviation. ``train_samples``
    keeps that many training images (a random subset picked by ``seed``), for limited-data experiments;
    the normalization stays that of the whole training split, so a model trained on a subset sees the
    same inputs as one trained on all of it (a teacher distilled into a student, for instance).

    Example:
        >>> from lightning_compress.data import DigitsDataModule
        >>> datamodule = DigitsDataModule(batch_size=32)
        >>> datamodule.setup("fit")
        >>> next(iter(datamodule.train_dataloader()))[0].shape
        torch.Size([32, 1, 8, 8])
    """

    num_classes: int
    input_shape: tuple[int, int, int]

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        train_samples: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if train_samples is not None and train_samples < 1:
            raise ValueError(f"train_samples must be a positive number of images or None (all), got {train_samples}")
        self.train_samples = train_samples
        self.val_fraction = val_fraction

    @abstractmethod
    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(train_images, train_labels, test_images, test_labels)``; images as ``(N, C, H, W)`` floats."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_x, train_y, test_x, test_y = self.load_tensors()
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(self.val_fraction * len(train_x)))
        val_index, train_index = order[:n_val], order[n_val:]
        mean = train_x[train_index].mean(dim=(0, 2, 3), keepdim=True)
        std = train_x[train_index].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        if self.train_samples is not None:
            if self.train_samples > len(train_index):
                raise ValueError(
                    f"train_samples={self.train_samples} is more than the {len(train_index)} training images"
                )
            train_index = train_index[: self.train_samples]  # a seeded random subset: the order is random

        def split(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
            return TensorDataset((images - mean) / std, labels.long())

        self.splits = {
            "train": split(train_x[train_index], train_y[train_index]),
            "val": split(train_x[val_index], train_y[val_index]),
            "test": split(test_x, test_y),
        }
