"""One measured snapshot of a model: everything the compression report shows about it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.analysis.latency import LatencyResult, check_latency_options, measure_latency
from lightning_compress.analysis.measure import (
    SparsityStats,
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    eval_mode,
    global_sparsity,
    layer_sparsity,
    size_on_disk,
)
from lightning_compress.deploy.compressed import compressed_bytes
from lightning_compress.deploy.onnx import OnnxRuntimeModel, onnx_bytes
from lightning_compress.quantization.layers import quantized_layers


@dataclass
class ModelProfile:
    """Parameters, non-zeros, sparsity, bytes on disk, MACs and latency of one model.

    ``onnx_bytes``, measured with ONNX Runtime latency, is the size of the ONNX graph that ran: integer
    layers where the model is fake-quantized, so it is the deployable size of a quantized model.
    ``compressed_bytes`` is the size of its ``export(..., format="compressed")`` file: every tensor in
    its fewest exact bytes, what pruning, quantization and clustering save on disk.

    Example:
        >>> import torch
        >>> profile = profile_model(torch.nn.Linear(4, 2), input_shape=(4,), latency_batch_sizes=())
        >>> profile.parameters, profile.macs
        (10, 8)
    """

    parameters: int
    nonzero_parameters: int
    weight_sparsity: SparsityStats
    layer_sparsity: dict[str, SparsityStats]
    size_bytes: int
    macs: int
    latency: dict[int, LatencyResult] = field(default_factory=dict)
    onnx_bytes: int | None = None
    compressed_bytes: int | None = None
    #: Layers with fake quantization on (integer layers in the ONNX export).
    quantized_layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers only, ready for JSON; latencies keyed by batch size as a string."""
        data = asdict(self)
        data["weight_sparsity"]["sparsity"] = self.weight_sparsity.sparsity
        for name, stats in self.layer_sparsity.items():
            data["layer_sparsity"][name]["sparsity"] = stats.sparsity
        data["latency"] = {str(batch): asdict(result) for batch, result in self.latency.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        """Rebuild a profile from :meth:`to_dict` output (derived ``sparsity`` fields are ignored)."""

        def stats(values: dict[str, Any]) -> SparsityStats:
            return SparsityStats(zeros=values["zeros"], total=values["total"])

        return cls(
            parameters=data["parameters"],
            nonzero_parameters=data["nonzero_parameters"],
            weight_sparsity=stats(data["weight_sparsity"]),
            layer_sparsity={name: stats(values) for name, values in data["layer_sparsity"].items()},
            size_bytes=data["size_bytes"],
            macs=data["macs"],
            latency={int(batch): LatencyResult(**values) for batch, values in data["latency"].items()},
            onnx_bytes=data.get("onnx_bytes"),
            compressed_bytes=data.get("compressed_bytes"),
            quantized_layers=data.get("quantized_layers", 0),
        )


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's first parameter lives and its floating dtype (CPU and float32 for a model without any)."""
    first = next(model.parameters(), None)
    if first is None:
        return torch.device("cpu"), torch.float32
    return first.device, first.dtype if first.is_floating_point() else torch.float32


def profile_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    latency_batch_sizes: Iterable[int] = (1,),
    latency_warmup: int = 5,
    latency_repeats: int = 30,
    num_threads: int | None = None,
    latency_runtime: str = "torch",
    compressed_size: bool = True,
) -> ModelProfile:
    """Measure ``model`` on inputs of ``input_shape`` (one sample, without the batch dimension).

    MACs are per sample (batch of one); latency is measured at each of ``latency_batch_sizes`` on the
    device the model's parameters are on, in eager PyTorch (``latency_runtime="torch"``) or in ONNX
    Runtime on the CPU (``"onnxruntime"``: the model is exported once, with a dynamic batch dimension,
    fake-quantized layers as integer layers, and the graph's size is recorded as ``onnx_bytes``).
    ``compressed_size`` measures ``compressed_bytes`` (xz reads dense float weights at a few MB/s: leave
    it out for large dense models when time matters).
    """
    latency_batch_sizes = list(latency_batch_sizes)
    check_latency_options(latency_batch_sizes, latency_warmup, latency_repeats, num_threads, latency_runtime)
    device, dtype = _device_and_dtype(model)
    shape = tuple(input_shape)
    generator = torch.Generator().manual_seed(0)

    def example(batch_size: int) -> torch.Tensor:
        return torch.randn((batch_size, *shape), generator=generator).to(device=device, dtype=dtype)

    runner: nn.Module | OnnxRuntimeModel = model
    graph = None
    if latency_runtime == "onnxruntime" and latency_batch_sizes:
        if device.type != "cpu":
            raise ValueError(f"latency_runtime='onnxruntime' measures on the CPU; the model is on {device}")
        graph = onnx_bytes(model, example(1))
        runner = OnnxRuntimeModel(graph, num_threads)
    return ModelProfile(
        parameters=count_parameters(model),
        nonzero_parameters=count_nonzero_parameters(model),
        weight_sparsity=global_sparsity(model),
        layer_sparsity=layer_sparsity(model),
        size_bytes=size_on_disk(model),
        macs=count_macs(model, example(1)),
        latency={
            batch: measure_latency(runner, example(batch), warmup=latency_warmup, repeats=latency_repeats, num_threads=num_threads)
            for batch in latency_batch_sizes
        },
        onnx_bytes=len(graph) if graph is not None else None,
        compressed_bytes=len(compressed_bytes(model)) if compressed_size else None,
        quantized_layers=sum(bool(layer.weight_quantizer.enabled) for layer in quantized_layers(model).values()),
    )


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` over ``(inputs, targets)`` batches, in eval mode (modes are restored).

    Inputs are moved to the device of the model's parameters, and floating inputs to their dtype.
    """
    device, dtype = _device_and_dtype(model)
    correct = total = 0
    with eval_mode(model):
        for inputs, targets, *_ in batches:
            inputs = inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)
            predictions = model(inputs).argmax(dim=-1)
            correct += int((predictions == targets.to(device)).sum())
            total += targets.numel()
    if total == 0:
        raise ValueError("evaluate_accuracy got no batches to evaluate")
    return correct / total
