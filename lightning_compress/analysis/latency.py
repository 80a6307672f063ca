"""Inference latency of a model: warm-up, timed repeats, the median, and the thread count it ran with."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


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

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / (self.median_ms / 1000.0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 30,
    num_threads: int | None = None,
) -> LatencyResult:
    """Time ``model(example_input)`` in eval mode and return the median of ``repeats`` runs after ``warmup``.

    ``num_threads`` sets torch's intra-op threads for the measurement only (the previous count is restored);
    the count used is recorded in the result, since latency on CPU depends on it.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"measure_latency needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    previous_threads = torch.get_num_threads()
    was_training = model.training
    device = example_input.device
    model.eval()
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
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return LatencyResult(
        batch_size=example_input.shape[0],
        median_ms=statistics.median(timings_ms),
        min_ms=min(timings_ms),
        max_ms=max(timings_ms),
        repeats=repeats,
        warmup=warmup,
        num_threads=threads_used,
        device=str(device),
    )
