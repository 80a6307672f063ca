from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from debian_data import needs_debian_package

from lightning_compress.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    InMemoryImageDataModule,
)
from lightning_compress.data.fashion_mnist import DEBIAN_IDX_DIR


def test_digits_splits_are_sized_deterministic_and_normalized() -> None:
    datamodule = DigitsDataModule(batch_size=50)
    datamodule.setup()
    sizes = {split: len(dataset) for split, dataset in datamodule.splits.items()}
    assert sizes == {"train": 1294, "val": 144, "test": 359}  # 1797 images: 20% test, 10% of the rest val
    train_images = datamodule.splits["train"].tensors[0]
    assert train_images.shape[1:] == (1, 8, 8)
    assert train_images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_images.std().item() == pytest.approx(1.0, abs=1e-3)

    again = DigitsDataModule(batch_size=50)
    again.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(datamodule.splits[split].tensors[0], again.splits[split].tensors[0])


class NumberedImages(InMemoryImageDataModule):
    """Image i is filled with the value i, so every split tells which images it holds."""

    num_classes = 2
    input_shape = (1, 2, 2)

    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        images = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 2, 2)
        return images[:30], torch.zeros(30), images[30:], torch.ones(10)


def test_splits_are_disjoint_and_cover_the_training_images() -> None:
    datamodule = NumberedImages(batch_size=4, val_fraction=0.2, seed=3)
    datamodule.setup()
    numbers = {split: datamodule.splits[split].tensors[0][:, 0, 0, 0] for split in ("train", "val", "test")}
    # Normalization is one affine map for all splits, so the order of the values is that of the image numbers.
    train_val = torch.cat([numbers["train"], numbers["val"]])
    assert len(numbers["train"]) == 24 and len(numbers["val"]) == 6 and len(numbers["test"]) == 10
    assert len(torch.unique(train_val)) == 30  # no image in both train and val
    assert numbers["test"].min() > train_val.max()  # the test images are the last ten, untouched by the split


def test_training_order_depends_only_on_the_seed_and_epoch() -> None:
    def first_labels(epoch: int, global_seed: int) -> torch.Tensor:
        datamodule = DigitsDataModule(batch_size=32)
        datamodule.setup()
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(global_seed)  # the global random state must not matter
        return next(iter(loader))[1]

    assert torch.equal(first_labels(0, global_seed=1), first_labels(0, global_seed=2))
    assert not torch.equal(first_labels(0, global_seed=1), first_labels(1, global_seed=1))


def test_each_distributed_rank_gets_its_own_shard() -> None:
    shards = []
    for rank in (0, 1):
        datamodule = NumberedImages(batch_size=4, val_fraction=0.2)
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        datamodule.setup()
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(0)
        shards.append(torch.cat([images[:, 0, 0, 0] for images, _ in loader]))
    assert len(shards[0]) == len(shards[1]) == 12
    assert len(torch.unique(torch.cat(shards))) == 24  # together, every training image exactly once


def test_bad_split_fractions_fail_early() -> None:
    with pytest.raises(ValueError, match="val_fraction must be in \\(0, 1\\), got 1.5"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="test_fraction"):
        DigitsDataModule(test_fraction=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path: Path, fake_fashion_idx, compress: bool) -> None:
    idx_dir, arrays = fake_fashion_idx(compress)
    datamodule = FashionMNISTDataModule(
        root=str(tmp_path / "root"), idx_dir=str(idx_dir), batch_size=4, val_fraction=0.25
    )
    datamodule.prepare_data()
    datamodule.setup()
    assert {split: len(d) for split, d in datamodule.splits.items()} == {"train": 18, "val": 6, "test": 8}
    assert torch.equal(datamodule.splits["test"].tensors[1], arrays["t10k-labels-idx1-ubyte"].long())
    # The test images are the IDX bytes, scaled to [0, 1] and normalized with the training statistics.
    test_images = datamodule.splits["test"].tensors[0]
    raw = arrays["t10k-images-idx3-ubyte"].float() / 255
    correlation = torch.corrcoef(torch.stack([test_images.flatten(), raw.flatten()]))[0, 1]
    assert correlation.item() == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_fashion_mnist_reads_torchvision_layout_without_idx_dir(tmp_path: Path, fake_fashion_idx) -> None:
    idx_dir, _ = fake_fashion_idx(False)
    FashionMNISTDataModule(root=str(tmp_path / "root"), idx_dir=str(idx_dir)).prepare_data()
    datamodule = FashionMNISTDataModule(
        root=str(tmp_path / "root"), idx_dir=str(tmp_path / "nowhere"), val_fraction=0.25
    )
    datamodule.setup()
    assert len(datamodule.splits["test"]) == 8


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(tmp_path: Path) -> None:
    datamodule = FashionMNISTDataModule(root=str(tmp_path / "root"), idx_dir=str(tmp_path / "idx"))
    with pytest.raises(FileNotFoundError) as error:
        datamodule.setup()
    message = str(error.value)
    assert str((tmp_path / "root" / "FashionMNIST" / "raw").resolve()) in message
    assert str(tmp_path / "idx") in message
    assert "apt-get install dataset-fashion-mnist" in message


@needs_debian_package(DEBIAN_IDX_DIR, "dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    datamodule = FashionMNISTDataModule(root=str(tmp_path))
    datamodule.prepare_data()
    datamodule.setup()
    assert {split: len(d) for split, d in datamodule.splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
    assert torch.bincount(datamodule.splits["test"].tensors[1]).tolist() == [1000] * 10


def test_missing_cifar10_fails_with_a_message_instead_of_downloading(tmp_path: Path) -> None:
    datamodule = CIFAR10DataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found in .*cifar-10-batches-py.*download=True"):
        datamodule.prepare_data()


def test_train_samples_keep_a_seeded_subset_of_the_training_split_and_the_same_validation() -> None:
    full, subset, again, other = (
        DigitsDataModule(seed=seed, train_samples=n) for seed, n in ((3, None), (3, 100), (3, 100), (4, 100))
    )
    for datamodule in (full, subset, again, other):
        datamodule.setup()
    assert (len(full.splits["train"]), len(subset.splits["train"])) == (1294, 100)
    assert torch.equal(
        subset.splits["val"].tensors[0], full.splits["val"].tensors[0]
    )  # the same validation images, normalized alike
    assert any(torch.equal(image, subset.splits["train"].tensors[0][0]) for image in full.splits["train"].tensors[0])
    assert torch.equal(subset.splits["train"].tensors[0], again.splits["train"].tensors[0])  # seeded
    assert not torch.equal(subset.splits["train"].tensors[1], other.splits["train"].tensors[1])
    with pytest.raises(ValueError, match="train_samples=5000 is more than the 1294 training images"):
        DigitsDataModule(train_samples=5000).setup()
    with pytest.raises(ValueError, match="train_samples must be a positive number of images or None"):
        DigitsDataModule(train_samples=0)
