"""Inference latency of a model: warm-up, timed repeats, the median, and the thread count it ran with."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_compress.analysis.measure import eval_mode

if TYPE_CHECKING:
    from lightning_compress.deploy import OnnxRuntimeModel

LATENCY_RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LatencyResult:
    """Timings of repeated forward passes on one batch.

    Example:
        >>> import torch
        >>> result = measure_latency(torch.nn.Linear(8, 2), torch.randn(1, 8), warmup=1, repeats=3)
        >>> result.batch_size, result.repeats
        (1, 3)
    """

    batch_size: int
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    num_threads: int
    device: str
    runtime: str = "torch"

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / (self.median_ms / 1000.0)


def check_latency_options(
    batch_sizes: Iterable[int] = (1,),
    warmup: int = 5,
    repeats: int = 30,
    num_threads: int | None = None,
    runtime: str = "torch",
) -> None:
    """Raise ``ValueError`` naming the bad value when a latency setting is out of range."""
    batch_sizes = list(batch_sizes)
    if any(batch < 1 for batch in batch_sizes):
        raise ValueError(f"latency batch sizes must be positive integers, got {batch_sizes}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"latency needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads}")
    if runtime not in LATENCY_RUNTIMES:
        raise ValueError(f"unknown latency runtime {runtime!r}; use one of {', '.join(LATENCY_RUNTIMES)}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    model: nn.Module | OnnxRuntimeModel,
    example_input: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 30,
    num_threads: int | None = None,
) -> LatencyResult:
    """Time ``model(example_input)`` in eval mode and return the median of ``repeats`` runs after ``warmup``.

    ``model`` is a module (eager PyTorch) or an :class:`~lightning_compress.deploy.OnnxRuntimeModel`.
    ``num_threads`` sets torch's intra-op threads for the measurement only (the previous count is restored);
    an ONNX Runtime session keeps the threads it was opened with. The count used is recorded in the
    result, since latency on CPU depends on it.
    """
    check_latency_options(example_input.shape[:1], warmup, repeats, num_threads)
    previous_threads = torch.get_num_threads()
    device = example_input.device
    is_module = isinstance(model, nn.Module)
    with eval_mode(model) if is_module else contextlib.nullcontext():
        try:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            for _ in range(warmup):
                model(example_input)
            _synchronize(device)
            timings_ms = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(example_input)
                _synchronize(device)
                timings_ms.append((time.perf_counter() - start) * 1000.0)
            threads_used = torch.get_num_threads() if is_module else model.num_threads
        finally:
            torch.set_num_threads(previous_threads)
    return LatencyResult(
        batch_size=example_input.shape[0],
        median_ms=statistics.median(timings_ms),
        min_ms=min(timings_ms),
        max_ms=max(timings_ms),
        repeats=repeats,
        warmup=warmup,
        num_threads=threads_used,
        device=str(device),
        runtime="torch" if is_module else model.runtime,
    )
