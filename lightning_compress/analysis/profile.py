"""One measured snapshot of a model: everything the compression report shows about it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from lightning_compress.analysis.latency import LatencyResult, Runner, check_latency_options, measure_latencies
from lightning_compress.analysis.measure import (
    SparsityStats,
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    global_sparsity,
    layer_sparsity,
    size_on_disk,
)
from lightning_compress.batches import (
    ModelInputs,
    batch_targets,
    call_model,
    input_tensors,
    map_inputs,
    model_inputs,
    output_logits,
    placed_like,
)
from lightning_compress.deploy.compressed import compressed_bytes
from lightning_compress.deploy.onnx import OnnxRuntimeModel, onnx_bytes
from lightning_compress.modules import eval_mode
from lightning_compress.quantization.layers import quantized_layers

#: What a model is measured on: the shape of one input without the batch dimension (standard normal floats
#: in the model's dtype), or an example batch, e.g. of token ids, whose first sample every batch repeats: one tensor,
#: a tuple of them, or tensors by keyword (a Hugging Face model's ``input_ids`` and ``attention_mask``).
Inputs = Sequence[int] | ModelInputs


@dataclass
class ModelProfile:
    """Parameters, non-zeros, sparsity, bytes on disk, MACs and latency of one model.

    ``onnx_bytes``, measured with ONNX Runtime latency, is the size of the ONNX graph that ran: integer
    layers where the model is fake-quantized, so it is the deployable size of a quantized model.
    ``compressed_bytes`` is the size of its ``export(..., format="compressed")`` file: every tensor in
    its fewest exact bytes, what pruning, quantization and clustering save on disk.

    Example:
        >>> import torch
        >>> profile = profile_model(torch.nn.Linear(4, 2), (4,), latency_batch_sizes=())
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
    inputs: Inputs,
    *,
    latency_batch_sizes: Iterable[int] = (1,),
    latency_warmup: int = 5,
    latency_repeats: int = 30,
    num_threads: int | None = None,
    latency_runtime: str = "torch",
    compressed_size: bool = True,
) -> ModelProfile:
    """Measure ``model`` on ``inputs``: the shape of one input (without the batch dimension) or an example
    batch (token ids, say, or a Hugging Face model's inputs by keyword), whose first sample makes every measured batch.

    MACs are per sample (batch of one); latency is measured at each of ``latency_batch_sizes`` as
    :func:`time_models` measures it, in eager PyTorch (``latency_runtime="torch"``) or in ONNX Runtime
    (``"onnxruntime"``, which records the graph's size as ``onnx_bytes``). ``compressed_size`` measures
    ``compressed_bytes`` (xz reads dense float weights at a few MB/s: leave it out for large dense
    models when time matters). To compare models' latencies, time them together with :func:`time_models`.
    """
    latency_batch_sizes = list(latency_batch_sizes)
    check_latency_options(latency_batch_sizes, latency_warmup, latency_repeats, num_threads, latency_runtime)
    device, dtype = _device_and_dtype(model)
    timed = time_models(
        {"model": model},
        inputs,
        {"model": latency_runtime},
        latency_batch_sizes,
        warmup=latency_warmup,
        repeats=latency_repeats,
        num_threads=num_threads,
    )["model"]
    return ModelProfile(
        parameters=count_parameters(model),
        nonzero_parameters=count_nonzero_parameters(model),
        weight_sparsity=global_sparsity(model),
        layer_sparsity=layer_sparsity(model),
        size_bytes=size_on_disk(model),
        macs=count_macs(model, example_batch(inputs, 1, device, dtype)),
        latency=timed.latency,
        onnx_bytes=timed.onnx_bytes,
        compressed_bytes=len(compressed_bytes(model)) if compressed_size else None,
        quantized_layers=sum(bool(layer.weight_quantizer.enabled) for layer in quantized_layers(model).values()),
    )


class TimedModel(NamedTuple):
    """A model's latency at each batch size, and the size of the ONNX graph that ran (``None`` in eager PyTorch)."""

    latency: dict[int, LatencyResult]
    onnx_bytes: int | None


def time_models(
    models: Mapping[str, nn.Module],
    inputs: Inputs,
    runtimes: Mapping[str, str],
    batch_sizes: Iterable[int] = (1,),
    *,
    warmup: int = 5,
    repeats: int = 30,
    rounds: int = 10,
    num_threads: int | None = None,
) -> dict[str, TimedModel]:
    """The latency of each of ``models`` in its runtime (``runtimes[name]``), all timed together at each batch size.

    A model runs in eager PyTorch (``"torch"``) on the device its parameters are on, or exported to ONNX
    (with a dynamic batch dimension, fake-quantized layers as integer layers) in an ONNX Runtime CPU
    session (``"onnxruntime"``). At each batch size every model gets the same inputs (:func:`example_batch`),
    floats in its dtype, and :func:`~lightning_compress.analysis.latency.measure_latencies` times them in
    interleaved, shuffled rounds, so their medians sample the same stretch of a noisy machine.

    Example:
        >>> import torch
        >>> models = {"dense": torch.nn.Linear(64, 64), "narrow": torch.nn.Linear(64, 4)}
        >>> timed = time_models(models, (64,), {"dense": "torch", "narrow": "onnxruntime"}, (1, 8), repeats=4, rounds=2)
        >>> sorted(timed["narrow"].latency), timed["narrow"].latency[8].runtime, timed["dense"].onnx_bytes
        ([1, 8], 'onnxruntime', None)
    """
    batch_sizes = list(batch_sizes)
    runners: dict[str, Runner] = {}
    graph_sizes: dict[str, int | None] = {}
    for name, model in models.items():
        check_latency_options(batch_sizes, warmup, repeats, num_threads, runtimes[name], rounds)
        device, dtype = _device_and_dtype(model)
        runners[name], graph_sizes[name] = model, None
        if runtimes[name] == "onnxruntime" and batch_sizes:
            if device.type != "cpu":
                raise ValueError(
                    f"latency_runtime='onnxruntime' measures on the CPU; the model {name!r} is on {device}"
                )
            graph = onnx_bytes(model, example_batch(inputs, 1, device, dtype))
            runners[name], graph_sizes[name] = OnnxRuntimeModel(graph, num_threads), len(graph)
    latency: dict[str, dict[int, LatencyResult]] = {name: {} for name in models}
    for batch in batch_sizes:
        contenders = {
            name: (runners[name], example_batch(inputs, batch, *_device_and_dtype(model)))
            for name, model in models.items()
        }
        for name, result in measure_latencies(
            contenders, warmup=warmup, repeats=repeats, rounds=rounds, num_threads=num_threads
        ).items():
            latency[name][batch] = result
    return {name: TimedModel(latency[name], graph_sizes[name]) for name in models}


def example_batch(inputs: Inputs, batch_size: int, device: torch.device, dtype: torch.dtype) -> ModelInputs:
    """A batch of ``batch_size`` for measuring, on ``device``: for a shape, standard normal floats of ``dtype``
    (the same for every model: seeded by the batch size); for an example batch, its first sample repeated in each
    of its tensors (floats cast to ``dtype``, integers such as token ids kept as they are).

    Example:
        >>> example_batch(torch.tensor([[5, 7, 0], [1, 1, 1]]), 2, torch.device("cpu"), torch.float16)
        tensor([[5, 7, 0],
                [5, 7, 0]])
        >>> example_batch({"input_ids": torch.tensor([[5, 7]]), "attention_mask": torch.tensor([[1, 0]])}, 3,
        ...               torch.device("cpu"), torch.float32)["attention_mask"].tolist()
        [[1, 0], [1, 0], [1, 0]]
    """
    if is_example_batch(inputs):
        for tensor in input_tensors(inputs):
            if tensor.dim() == 0 or len(tensor) == 0:
                raise ValueError(
                    f"an example batch needs a batch dimension and one sample at least, got shape {tuple(tensor.shape)}"
                )
        batch = map_inputs(inputs, lambda tensor: tensor[:1].expand(batch_size, *tensor.shape[1:]).contiguous())
        return placed_like(batch, device, dtype)
    generator = torch.Generator().manual_seed(batch_size)
    return torch.randn((batch_size, *inputs), generator=generator).to(device=device, dtype=dtype)


def is_example_batch(inputs: Inputs) -> bool:
    """Whether ``inputs`` is an example batch (a tensor, a tuple of tensors, tensors by keyword), not a shape.

    Example:
        >>> is_example_batch((3, 8, 8)), is_example_batch({"input_ids": torch.ones(1, 4)})
        (False, True)
    """
    if isinstance(inputs, (torch.Tensor, Mapping)):
        return True
    return isinstance(inputs, tuple) and bool(inputs) and all(isinstance(item, torch.Tensor) for item in inputs)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[Any]) -> float:
    """Top-1 accuracy of ``model`` over ``(inputs, targets)`` batches or dict batches in Hugging Face's convention
    (``labels`` the targets), in eval mode (modes are restored); the model may return a ``ModelOutput``.

    Inputs are moved to the device of the model's parameters, and floating inputs to their dtype.
    """
    device, dtype = _device_and_dtype(model)
    correct = total = 0
    with eval_mode(model):
        for batch in batches:
            inputs, targets = placed_like(model_inputs(batch), device, dtype), batch_targets(batch)
            predictions = output_logits(call_model(model, inputs)).argmax(dim=-1)
            correct += int((predictions == targets.to(device)).sum())
            total += targets.numel()
    if total == 0:
        raise ValueError("evaluate_accuracy got no batches to evaluate")
    return correct / total
