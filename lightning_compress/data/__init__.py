"""LightningDataModules: bundled digits (the default), Fashion-MNIST, CIFAR-10 and WordNet supersenses from local files."""

from lightning_compress.data.base import InMemoryImageDataModule, TensorSplitsDataModule
from lightning_compress.data.cifar10 import CIFAR10DataModule
from lightning_compress.data.digits import DigitsDataModule
from lightning_compress.data.fashion_mnist import FashionMNISTDataModule
from lightning_compress.data.wordnet import WordNetSupersensesDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "InMemoryImageDataModule",
    "TensorSplitsDataModule",
    "WordNetSupersensesDataModule",
]
