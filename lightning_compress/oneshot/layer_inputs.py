"""Layer by layer through a model on calibration batches: each linear layer's inputs gathered with forward
hooks, the layer compressed, and the next layer's inputs gathered from the model as compressed so far."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from lightning_compress.batches import ModelInputs, call_model, model_inputs, placed_like
from lightning_compress.finiteness import require_finite_batch
from lightning_compress.modules import eval_mode
from lightning_compress.oneshot.hessian import InputGram

#: What compresses one group of layers that read the same input: the layers by name, and their inputs' Gram matrix.
CompressGroup = Callable[[Mapping[str, nn.Linear], InputGram], None]


class _InputsGathered(Exception):
    """Raised by a hook to stop a forward pass once the layer it watches has read all its inputs."""


@dataclass(frozen=True)
class LayerGroup:
    """Layers that read the same tensor, in the order the forward pass calls them (a transformer's query, key
    and value), and how often the first of them is called in one forward pass."""

    names: tuple[str, ...]
    calls: int


def token_positions(model: nn.Module, inputs: ModelInputs) -> torch.Tensor | None:
    """Where ``inputs`` hold real tokens, not padding: a dict batch's ``attention_mask``, or token ids ``(N, L)``
    other than the ``pad_token_id`` of the model (or of one of its modules); ``None`` for other inputs (a tuple's).

    A linear layer's inputs at padding positions are computed but never used, so they do not count.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> model.pad_token_id = 0
        >>> token_positions(model, torch.tensor([[5, 7, 0]])).tolist()
        [[True, True, False]]
    """
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        return None if mask is None else mask.bool()
    if isinstance(inputs, tuple) or inputs.dim() != 2 or inputs.is_floating_point():
        return None
    pad = next((m.pad_token_id for m in model.modules() if isinstance(getattr(m, "pad_token_id", None), int)), None)
    return None if pad is None else inputs != pad


def layer_groups(model: nn.Module, layers: Mapping[str, nn.Linear], inputs: ModelInputs) -> list[LayerGroup]:
    """The ``layers`` in the order one forward pass on ``inputs`` calls them, those reading the same tensor
    one after another grouped; a layer the pass never calls raises ``ValueError``."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding each input alive, so no later one reuses its memory
    handles = [
        layer.register_forward_pre_hook(lambda _, args, name=name: calls.append((name, args[0])))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad(), eval_mode(model):
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    never = [name for name in layers if name not in {name for name, _ in calls}]
    if never:
        raise ValueError(
            f"one-shot compression needs the inputs of each targeted layer; the forward pass never calls {never} (exclude them)"
        )
    counts = {name: sum(called == name for called, _ in calls) for name in layers}
    groups: list[list[str]] = []
    seen: set[str] = set()
    previous_input = None
    for name, read in calls:
        if name in seen:
            continue
        if groups and _same_tensor(read, previous_input):
            groups[-1].append(name)
        else:
            groups.append([name])
        seen.add(name)
        previous_input = read
    return [LayerGroup(tuple(names), counts[names[0]]) for names in groups]


def _same_tensor(one: torch.Tensor, other: torch.Tensor | None) -> bool:
    """Whether ``one`` and ``other`` are the same values in the same memory (both alive, so none reused it)."""
    return (
        other is not None
        and one.data_ptr() == other.data_ptr()
        and one.shape == other.shape
        and one.stride() == other.stride()
    )


@torch.no_grad()
def compress_layer_by_layer(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    batches: Sequence[ModelInputs],
    compress: CompressGroup,
    progress: bool = True,
    reference_weights: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Call ``compress`` on each group of ``layers`` (see :func:`layer_groups`) in forward order, with the Gram
    matrix of the group's inputs on ``batches`` as the model computes them after the groups before it were
    compressed (the papers' sequential order). One Gram matrix is held at a time, and each pass stops when the
    group has read its inputs. The model runs in eval mode; only real tokens count (:func:`token_positions`).
    With ``reference_weights`` (each layer's weight before compression) the Gram matrix also holds the cross
    products with the inputs the layer reads when the model runs with those weights (:class:`InputGram`
    ``cross``): the model before compression, without a copy of it.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> seen = []
        >>> compress_layer_by_layer(model, {"0": model[0], "2": model[2]}, [torch.randn(8, 4)],
        ...                         lambda group, gram: seen.append((list(group), gram.rows)), progress=False)
        >>> seen
        [(['0'], 8), (['2'], 8)]
    """
    if not batches:
        raise ValueError("one-shot compression needs at least one calibration batch")
    groups = layer_groups(model, layers, batches[0])
    with eval_mode(model), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("one-shot compression, layer by layer", total=len(groups))
        for group in groups:
            first = layers[group.names[0]]
            gram = InputGram(first.in_features, first.weight.device, cross=reference_weights is not None)
            for index, inputs in enumerate(batches):
                reads = _layer_inputs(model, first, inputs, group.calls)
                if not all(bool(torch.isfinite(read).all()) for read in reads):
                    raise ValueError(
                        f"the inputs of layer {group.names[0]!r} on calibration batch {index} are NaN or infinite, "
                        "though the batch is finite: the layers before it overflow on it; drop or scale that batch"
                    )
                references: list[torch.Tensor | None] = [None] * len(reads)
                if reference_weights is not None:
                    with _weights_swapped(layers, reference_weights):
                        references = _layer_inputs(model, first, inputs, group.calls)
                for read, reference_read in zip(reads, references, strict=True):
                    gram.add(read, reference_read)
                if not bool(torch.isfinite(gram.matrix).all()):
                    raise ValueError(
                        f"the products of the inputs of layer {group.names[0]!r} overflow on calibration batch {index} "
                        f"(inputs up to {max(float(read.abs().max()) for read in reads):.3g}): drop or scale that batch"
                    )
            compress({name: layers[name] for name in group.names}, gram)
            bar.advance(task)


@contextmanager
def _weights_swapped(layers: Mapping[str, nn.Linear], weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run with ``weights`` in place of the ``layers``' own (their storage swapped, nothing copied)."""
    own = {name: layer.weight.data for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.weight.data = weights[name]
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.weight.data = own[name]


def _layer_inputs(model: nn.Module, layer: nn.Linear, inputs: ModelInputs, calls: int) -> list[torch.Tensor]:
    """The rows ``layer`` reads at real tokens in each of its ``calls`` when ``model`` runs on ``inputs``, the pass
    stopped after the last."""
    positions = token_positions(model, inputs)
    reads: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple) -> None:
        rows = args[0]
        if positions is not None and rows.dim() == 3 and rows.shape[:2] == positions.shape:
            rows = rows[positions]
        reads.append(rows)
        if len(reads) == calls:
            raise _InputsGathered

    handle = layer.register_forward_pre_hook(hook)
    try:
        call_model(model, inputs)
    except _InputsGathered:
        pass
    finally:
        handle.remove()
    return reads


def calibration_inputs(
    batches: Iterable[Any], count: int | None, device: torch.device, dtype: torch.dtype
) -> list[ModelInputs]:
    """What the model is called with for the first ``count`` of ``batches`` (every batch with ``None``), placed
    beside it: a batch's inputs (``(inputs, targets)``), or a dict batch's tensors but its labels."""
    inputs = [placed_like(model_inputs(batch), device, dtype) for batch in islice(batches, count)]
    if not inputs:
        raise ValueError("one-shot compression got no calibration batches")
    for index, batch in enumerate(inputs):
        require_finite_batch(batch, index, "One-shot compression computes each layer's inputs")
    return inputs
