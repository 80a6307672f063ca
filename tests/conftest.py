from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # pytest-xdist's workers share the cores: one thread pool each of cores / workers, not of all cores each.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def timed_together(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], dict]]:
    """Each call of ``measure_latencies`` (through ``time_models``): the names timed together, and the options."""
    import lightning_compress.analysis.profile as profiling

    calls: list[tuple[list[str], dict]] = []
    measure_latencies = profiling.measure_latencies

    def recording(contenders: dict, **options: object) -> dict:
        calls.append((list(contenders), options))
        return measure_latencies(contenders, **options)

    monkeypatch.setattr(profiling, "measure_latencies", recording)
    return calls


@pytest.fixture
def compose_config() -> Iterator[Callable[..., DictConfig]]:
    """Compose ``train.yaml`` from the packaged configs with the given overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_compress.configs", version_base="1.3"):
        yield lambda *overrides: compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()


def write_idx(path: Path, array: torch.Tensor, compress: bool) -> None:
    """Write a uint8 tensor in the IDX format of (Fashion-)MNIST: magic 0x08, dims, big-endian sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + b"".join(struct.pack(">I", size) for size in array.shape)
    payload = header + array.to(torch.uint8).numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.fixture
def fake_fashion_idx(tmp_path: Path) -> Callable[[bool], tuple[Path, dict[str, torch.Tensor]]]:
    """A folder with the four Fashion-MNIST IDX files (24 train, 8 test images of 28x28), gzipped or not."""

    def make(compress: bool) -> tuple[Path, dict[str, torch.Tensor]]:
        directory = tmp_path / ("idx_gz" if compress else "idx")
        directory.mkdir()
        generator = torch.Generator().manual_seed(0)
        arrays = {
            "train-images-idx3-ubyte": torch.randint(0, 256, (24, 28, 28), generator=generator, dtype=torch.uint8),
            "train-labels-idx1-ubyte": torch.arange(24, dtype=torch.uint8) % 10,
            "t10k-images-idx3-ubyte": torch.randint(0, 256, (8, 28, 28), generator=generator, dtype=torch.uint8),
            "t10k-labels-idx1-ubyte": torch.arange(8, dtype=torch.uint8) % 10,
        }
        for name, array in arrays.items():
            write_idx(directory / name, array, compress)
        return directory, arrays

    return make
