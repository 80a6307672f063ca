"""Inference latency: warm-up, timed repeats in interleaved shuffled rounds, the median, and the thread count.

Several models timed one after the other on a shared, noisy machine see different noise: a burst of
load lands on one of them. :func:`measure_latencies` therefore times them in rounds, each round in a
new random order, each model a slice of its repeats per round, so every model samples the same
stretch of time and their medians compare.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import nn

from lightning_compress.batches import ModelInputs, call_model, input_tensors
from lightning_compress.modules import eval_mode

if TYPE_CHECKING:
    from lightning_compress.deploy import OnnxRuntimeModel

LATENCY_RUNTIMES = ("torch", "onnxruntime")
#: What :func:`measure_latencies` times: a module (eager PyTorch) or an ONNX Runtime session.
Runner = Union[nn.Module, "OnnxRuntimeModel"]


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
    rounds: int = 1,
) -> None:
    """Raise ``ValueError`` naming the bad value when a latency setting is out of range."""
    batch_sizes = list(batch_sizes)
    if any(batch < 1 for batch in batch_sizes):
        raise ValueError(f"latency batch sizes must be positive integers, got {batch_sizes}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"latency needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if rounds < 1:
        raise ValueError(f"latency rounds must be at least 1, got {rounds}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads}")
    if runtime not in LATENCY_RUNTIMES:
        raise ValueError(f"unknown latency runtime {runtime!r}; use one of {', '.join(LATENCY_RUNTIMES)}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: Runner,
    example_input: ModelInputs,
    *,
    warmup: int = 5,
    repeats: int = 30,
    num_threads: int | None = None,
) -> LatencyResult:
    """Time ``model(example_input)`` in eval mode and return the median of ``repeats`` runs after ``warmup``.

    ``model`` is a module (eager PyTorch) or an :class:`~lightning_compress.deploy.OnnxRuntimeModel`;
    ``example_input`` one tensor, a tuple of them or tensors by keyword (:func:`~lightning_compress.batches.call_model`).
    ``num_threads`` sets torch's intra-op threads for the measurement only (the previous count is restored);
    an ONNX Runtime session keeps the threads it was opened with. The count used is recorded in the
    result, since latency on CPU depends on it. To compare models, time them together with
    :func:`measure_latencies`.
    """
    return measure_latencies(
        {"model": (model, example_input)}, warmup=warmup, repeats=repeats, num_threads=num_threads
    )["model"]


@torch.inference_mode()
def measure_latencies(
    contenders: Mapping[str, tuple[Runner, ModelInputs]],
    *,
    warmup: int = 5,
    repeats: int = 30,
    rounds: int = 10,
    num_threads: int | None = None,
    seed: int = 0,
) -> dict[str, LatencyResult]:
    """Time each ``model(example_input)`` of ``contenders`` in interleaved, shuffled rounds; the median per model.

    Every model first runs ``warmup`` times, then ``repeats`` timed times spread over ``rounds``
    rounds (as evenly as they divide); each round visits the models in a new order drawn from ``seed``.
    Settings as in :func:`measure_latency`.

    Example:
        >>> import torch
        >>> x = torch.randn(1, 64)
        >>> results = measure_latencies({"wide": (torch.nn.Linear(64, 512), x), "narrow": (torch.nn.Linear(64, 8), x)}, repeats=6, rounds=3)
        >>> [(name, result.repeats) for name, result in results.items()]
        [('wide', 6), ('narrow', 6)]
    """
    for model, example_input in contenders.values():
        check_latency_options([_batch_size(example_input)], warmup, repeats, num_threads, rounds=rounds)
    rounds = min(rounds, repeats)
    per_round = [repeats // rounds + (index < repeats % rounds) for index in range(rounds)]
    order = random.Random(seed)
    previous_threads = torch.get_num_threads()
    timings_ms: dict[str, list[float]] = {name: [] for name in contenders}
    with contextlib.ExitStack() as stack:
        for model, _ in contenders.values():
            if isinstance(model, nn.Module):
                stack.enter_context(eval_mode(model))
        try:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            names = list(contenders)
            for name in names:
                _run(*contenders[name], warmup)
            for calls in per_round:
                order.shuffle(names)
                for name in names:
                    timings_ms[name] += _run(*contenders[name], calls)
            threads = {
                name: torch.get_num_threads() if isinstance(model, nn.Module) else model.num_threads
                for name, (model, _) in contenders.items()
            }
        finally:
            torch.set_num_threads(previous_threads)
    return {
        name: LatencyResult(
            batch_size=_batch_size(example_input),
            median_ms=statistics.median(timings_ms[name]),
            min_ms=min(timings_ms[name]),
            max_ms=max(timings_ms[name]),
            repeats=repeats,
            warmup=warmup,
            num_threads=threads[name],
            device=str(input_tensors(example_input)[0].device),
            runtime="torch" if isinstance(model, nn.Module) else model.runtime,
        )
        for name, (model, example_input) in contenders.items()
    }


def _batch_size(example_input: ModelInputs) -> int:
    return input_tensors(example_input)[0].shape[0]


def _run(model: Runner, example_input: ModelInputs, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``model(example_input)``, the device synchronized after each."""
    device = input_tensors(example_input)[0].device
    timings_ms = []
    for _ in range(calls):
        start = time.perf_counter()
        call_model(model, example_input)
        _synchronize(device)
        timings_ms.append((time.perf_counter() - start) * 1000.0)
    return timings_ms
