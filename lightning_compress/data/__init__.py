"""LightningDataModules: bundled digits (the default), Fashion-MNIST and CIFAR-10 from local files."""

from lightning_compress.data.base import InMemoryImageDataModule
from lightning_compress.data.cifar10 import CIFAR10DataModule
from lightning_compress.data.digits import DigitsDataModule
from lightning_compress.data.fashion_mnist import FashionMNISTDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "FashionMNISTDataModule", "InMemoryImageDataModule"]
