"""CIFAR-10 through torchvision, with downloading off unless asked for."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from lightning_compress.data.base import InMemoryImageDataModule


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10, 50,000 + 10,000 32x32 colour images of 10 classes, read by torchvision from ``root``.

    ``download`` is off by default, so a missing data set fails at setup with a message instead of
    reaching for the network.

    Example:
        >>> datamodule = CIFAR10DataModule(root="data", batch_size=128)  # doctest: +SKIP
        >>> datamodule.setup()  # doctest: +SKIP
    """

    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        train_samples: int | None = None,
    ) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed, train_samples)
        self.root = Path(root)
        self.download = download

    def prepare_data(self) -> None:
        self._dataset(train=True)
        self._dataset(train=False)

    def _dataset(self, train: bool) -> CIFAR10:
        try:
            return CIFAR10(str(self.root), train=train, download=self.download)
        except RuntimeError as error:
            raise FileNotFoundError(
                f"CIFAR-10 not found in '{(self.root / 'cifar-10-batches-py').resolve()}' ({error}). Put torchvision's "
                "'cifar-10-batches-py' folder under `root`, or set `download=True` on a machine with internet "
                "(`lightning-compress data=cifar10 data.download=true`)."
            ) from error

    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        train, test = self._dataset(train=True), self._dataset(train=False)
        return (
            _as_images(train.data),
            torch.as_tensor(train.targets),
            _as_images(test.data),
            torch.as_tensor(test.targets),
        )


def _as_images(data: object) -> torch.Tensor:
    """``(N, 32, 32, 3)`` uint8 array to ``(N, 3, 32, 32)`` floats in [0, 1]."""
    return torch.as_tensor(data).permute(0, 3, 1, 2).float() / 255.0
