"""scikit-learn's bundled handwritten digits: real data that needs no download."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from lightning_compress.data.base import InMemoryImageDataModule


class DigitsDataModule(InMemoryImageDataModule):
    """The 1,797 8x8 UCI handwritten digits shipped with scikit-learn, 10 classes.

    The data has no official test split: a seeded ``test_fraction`` is held out first, then
    ``val_fraction`` of the rest is used for validation.

    Example:
        >>> datamodule = DigitsDataModule(batch_size=64, test_fraction=0.2)
        >>> datamodule.setup()
        >>> len(datamodule.test_dataloader().dataset)
        359
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
        train_samples: int | None = None,
    ) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed, train_samples)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction

    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed + 1))
        n_test = round(self.test_fraction * len(images))
        test, train = order[:n_test], order[n_test:]
        return images[train], labels[train], images[test], labels[test]
