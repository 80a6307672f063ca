"""Fashion-MNIST from local files: Debian's ``dataset-fashion-mnist`` package or torchvision's layout."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST
from torchvision.datasets.utils import extract_archive

from lightning_compress.data.base import InMemoryImageDataModule

#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
DEBIAN_IDX_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class FashionMNISTDataModule(InMemoryImageDataModule):
    """Zalando's Fashion-MNIST, 60,000 + 10,000 28x28 grey images of 10 kinds of clothing.

    Nothing is downloaded. The data is read with torchvision's ``FashionMNIST`` from ``root`` in
    torchvision's layout (``root/FashionMNIST/raw/*-ubyte``); when it is not there but the IDX files
    are in ``idx_dir`` (gzipped or not, as Debian's ``dataset-fashion-mnist`` installs them), they are
    unpacked into that layout once.

    Example:
        >>> datamodule = FashionMNISTDataModule(root="data", batch_size=256)  # doctest: +SKIP
        >>> datamodule.setup()  # doctest: +SKIP
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        root: str = "data",
        idx_dir: str = DEBIAN_IDX_DIR,
        batch_size: int = 128,
        val_fraction: float = 1 / 12,
        num_workers: int = 0,
        seed: int = 0,
        train_samples: int | None = None,
    ) -> None:
        super().__init__(batch_size, val_fraction, num_workers, seed, train_samples)
        self.root = Path(root)
        self.idx_dir = Path(idx_dir)

    @property
    def raw_folder(self) -> Path:
        return self.root / "FashionMNIST" / "raw"

    def prepare_data(self) -> None:
        """Unpack the IDX files from ``idx_dir`` into ``root`` when torchvision's layout is not there yet."""
        missing = [name for name in _IDX_FILES if not (self.raw_folder / name).is_file()]
        if not missing:
            return
        sources = {name: self._idx_source(name) for name in missing}
        if None in sources.values():
            raise FileNotFoundError(
                f"Fashion-MNIST not found: looked for {', '.join(missing)} in torchvision's layout under "
                f"'{self.raw_folder.resolve()}' and as IDX files (optionally .gz) in '{self.idx_dir}'. "
                "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian and Ubuntu put it in "
                f"{DEBIAN_IDX_DIR}), or point `root` at a folder where torchvision.datasets.FashionMNIST "
                "downloaded it, or `idx_dir` at a folder holding the four IDX files."
            )
        self.raw_folder.mkdir(parents=True, exist_ok=True)
        # Unpack beside the final place and rename, so an interrupted run leaves no half-written file there.
        with tempfile.TemporaryDirectory(dir=self.raw_folder) as staging:
            for name, source in sources.items():
                if source.suffix == ".gz":
                    extract_archive(str(source), staging)
                else:
                    shutil.copyfile(source, Path(staging) / name)
                os.replace(Path(staging) / name, self.raw_folder / name)

    def _idx_source(self, name: str) -> Path | None:
        for candidate in (self.idx_dir / name, self.idx_dir / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self.prepare_data()
        train = FashionMNIST(str(self.root), train=True, download=False)
        test = FashionMNIST(str(self.root), train=False, download=False)
        return _as_images(train.data), train.targets, _as_images(test.data), test.targets


def _as_images(data: torch.Tensor) -> torch.Tensor:
    """``(N, 28, 28)`` uint8 to ``(N, 1, 28, 28)`` floats in [0, 1]."""
    return data.unsqueeze(1).float() / 255.0
