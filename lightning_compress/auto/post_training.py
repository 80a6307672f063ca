"""Mixed-precision post-training quantization within a byte budget: each layer's weight grid (4 or 8 bits, a scale
an output channel or per group of input columns) chosen where it harms the model least, without training.

For every targeted layer and every grid that fits it, the layer alone is rounded onto the grid (by GPTQ from its
inputs on the calibration batches, as the plan is then applied, or to nearest) and the model's outputs on those
batches are compared with its own: the damage is their summed squared change relative to their summed squares.
The cost is the bytes the ONNX export writes for the layer's weight on that grid (:func:`weight_onnx_bytes`), what
a runtime loads. The plan, one grid a layer with the least summed damage within the budget, is the multiple-choice
knapsack that :func:`~lightning_compress.auto.allocation.least_damage_plan` solves exactly; one-shot quantization
applies it, each layer on its own grids (:func:`~lightning_compress.oneshot.one_shot_quantize` with
``BitPlan.config``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.arguments import check_argument, is_int, is_number
from lightning_compress.auto.allocation import least_damage_plan, plan_cost
from lightning_compress.auto.sensitivity import Candidate
from lightning_compress.batches import ModelInputs, call_model, output_logits
from lightning_compress.finiteness import require_finite
from lightning_compress.modules import eval_mode
from lightning_compress.oneshot.hessian import BLOCK_SIZE, DAMPING, InputGram
from lightning_compress.oneshot.layer_inputs import calibration_inputs, compress_layer_by_layer
from lightning_compress.oneshot.quantization import OneShotQuantizationConfig, rounded_weight, target_layers
from lightning_compress.quantization.config import BITS, QuantConfig
from lightning_compress.quantization.layers import QuantizedLayer
from lightning_compress.targets import TargetSpec

#: A symmetric weight-only grid: (weight bits, group size), a scale an output channel and group of that many input
#: columns; group size ``None``: one group spanning the row (a scale an output channel, or an embedding table's row)
Grid = tuple[int, int | None]
#: The grids a layer may take by default: 8 bits a scale an output channel; 4 bits a scale an output channel and
#: group of 128, 64 or 32 input columns, or an output channel
GRIDS: tuple[Grid, ...] = ((8, None), (4, 128), (4, 64), (4, 32), (4, None))
#: The bytes of a float weight and of a scale in the export (float32, whatever the model's dtype)
FLOAT_BYTES = 4


@dataclass(frozen=True)
class BitPlan:
    """The grids :func:`allocate_bits` chose: ``config`` applies them (``one_shot_quantize(model, batches,
    plan.config)``), ``chosen`` holds each layer's :class:`Candidate` (its grids as a ``QuantConfig``, damage and
    bytes) and ``measured`` every candidate of every layer.

    Example:
        >>> chosen = Candidate("fc", QuantConfig(weight_bits=4, group_size=8), damage=0.01, cost=40)
        >>> plan = BitPlan(OneShotQuantizationConfig(layer_quantization={"fc": chosen.setting}), {"fc": chosen}, {"fc": [chosen]})
        >>> plan.predicted_bytes, plan.predicted_damage
        (40, 0.01)
    """

    config: OneShotQuantizationConfig
    chosen: dict[str, Candidate]
    measured: dict[str, list[Candidate]]

    @classmethod
    def within(
        cls, measured: Mapping[str, Sequence[Candidate]], max_bytes: int, config: OneShotQuantizationConfig
    ) -> BitPlan:
        """The candidate of each layer of ``measured`` (each a layer's grids, damage and bytes) with the least summed
        damage whose bytes sum to at most ``max_bytes`` (:func:`~lightning_compress.auto.allocation.least_damage_plan`),
        rounded by ``config``'s method and settings; ``ValueError`` below the cheapest plan. Another budget, or a subset
        of the layers, needs no new measurement.

        Example:
            >>> options = {"fc": [Candidate("fc", QuantConfig(weight_bits=bits, group_size=8), damage, cost)
            ...                   for bits, damage, cost in ((8, 0.001, 72), (4, 0.01, 40))]}
            >>> BitPlan.within(options, 50, OneShotQuantizationConfig()).config.layer_quantization["fc"].weight_bits
            4
        """
        _check_budget(max_bytes, sum(min(candidate.cost for candidate in options) for options in measured.values()))
        chosen = least_damage_plan(measured, max_bytes)
        own = {name: candidate.setting for name, candidate in chosen.items()}
        planned = dataclasses.replace(config, targets=None, exclude=None, layer_quantization=own)
        return cls(planned, chosen, {name: list(candidates) for name, candidates in measured.items()})

    @property
    def predicted_bytes(self) -> int:
        """The bytes the export writes for the planned layers' weights."""
        return plan_cost(self.chosen)

    @property
    def predicted_damage(self) -> float:
        """The summed damage of the chosen grids, each measured alone."""
        return sum(candidate.damage for candidate in self.chosen.values())


@torch.no_grad()
def allocate_bits(
    model: nn.Module,
    batches: Iterable[Any],
    max_bytes: int,
    grids: Sequence[Grid] = GRIDS,
    *,
    targets: TargetSpec = None,
    exclude: TargetSpec = None,
    method: str = "gptq",
    act_order: bool = False,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
    calibration_batches: int | None = None,
    progress: bool = True,
) -> BitPlan:
    """The grid of each targeted layer of ``model`` (every ``nn.Linear`` by default; ``nn.Embedding`` tables where
    ``targets`` names their type) among ``grids`` that change the model's outputs on the first
    ``calibration_batches`` of ``batches`` the least, together, while the ONNX export of their weights takes at
    most ``max_bytes``; ``model`` is unchanged.

    Each layer takes the grids that fit it (a group size that divides its input features; a table, one scale a
    row). Each is measured with the layer alone rounded onto it by ``method`` (``"gptq"`` with ``act_order``,
    ``damping``, ``block_size``, or ``"rtn"``; tables to nearest), as the plan's ``config`` then rounds the
    whole model. A ``max_bytes`` below the cheapest plan (every layer on its cheapest grid) raises ``ValueError``
    before any measurement. A table that the export folds into a constant (a BERT's position embeddings, at a
    fixed sequence length) stays float in the file: leave it out.

    Example:
        >>> from lightning_compress.oneshot import one_shot_quantize
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> batches = [torch.randn(32, 64) for _ in range(2)]
        >>> budget = sum(weight_onnx_bytes(layer, QuantConfig(weight_bits=4, group_size=32)) for layer in (model[0], model[2]))
        >>> plan = allocate_bits(model, batches, budget, grids=[(8, None), (4, 32), (4, None)], progress=False)
        >>> plan.predicted_bytes <= budget, sorted(one_shot_quantize(model, batches, plan.config, progress=False))
        (True, ['0', '2'])
    """
    check_argument(
        "grids",
        grids,
        isinstance(grids, Sequence) and len(grids) > 0 and all(_is_grid(grid) for grid in grids),
        f"a non-empty sequence of (weight bits from {BITS.start} to {BITS.stop - 1}, group size: an int >= 1 or None)",
    )
    check_argument("max_bytes", max_bytes, is_number(max_bytes) and max_bytes >= 0, "a number of bytes >= 0")
    settings = OneShotQuantizationConfig(
        method, act_order=act_order, targets=targets, exclude=exclude, damping=damping, block_size=block_size
    )
    layers = target_layers(model, settings)
    quantized = [name for name, layer in layers.items() if isinstance(layer, QuantizedLayer)]
    if quantized:
        raise ValueError(f"allocate_bits measures a float model; {quantized} are quantized already")
    options = {name: _fitting_grids(name, layer, grids) for name, layer in layers.items()}
    cheapest = sum(min(weight_onnx_bytes(layers[name], grid) for grid in fits) for name, fits in options.items())
    _check_budget(max_bytes, cheapest)
    require_finite(dict(model.named_parameters()), "allocate_bits rounds and runs the parameters")
    weight = next(iter(layers.values())).weight
    inputs = calibration_inputs(batches, calibration_batches, weight.device, weight.dtype)
    return BitPlan.within(measure_grids(model, layers, options, inputs, settings, progress), max_bytes, settings)


class OutputChange:
    """How far ``model``'s outputs on ``batches`` have moved from what they were when this was made: their summed
    squared change relative to their summed squares, each time it is called (run it with the model in eval mode).
    Unlike the KL divergence of :class:`~lightning_compress.auto.sensitivity.PredictionDamage`, it reads any
    output, an embedding as well as logits.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> change = OutputChange(model, [torch.randn(8, 4)])
        >>> change()
        0.0
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(-1.0), model.bias.mul_(-1.0)
        >>> change()
        4.0
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, batches: Sequence[ModelInputs]) -> None:
        self.model, self.batches = model, batches
        self.reference = [output_logits(call_model(model, inputs)).float() for inputs in batches]
        self.energy = max(sum(float(output.square().sum()) for output in self.reference), torch.finfo().tiny)

    @torch.no_grad()
    def __call__(self) -> float:
        change = sum(
            float((output_logits(call_model(self.model, inputs)).float() - before).square().sum())
            for inputs, before in zip(self.batches, self.reference)
        )
        return change / self.energy


@torch.no_grad()
def measure_grids(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    options: Mapping[str, Sequence[QuantConfig]],
    batches: Sequence[ModelInputs],
    config: OneShotQuantizationConfig,
    progress: bool = True,
) -> dict[str, list[Candidate]]:
    """Each layer of ``layers`` (name -> an ``nn.Linear`` or ``nn.Embedding`` of ``model``) rounded alone onto each of
    its ``options`` (weight-only grids, see :func:`weight_onnx_bytes`) by ``config``'s method (linear layers by
    GPTQ from their inputs on ``batches``, as the model computes them in float), measured on ``batches``: the
    summed squared change of the model's outputs relative to their summed squares, and the bytes the export writes
    for the weight; by layer name. ``model`` is unchanged afterwards.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> options = {"0": [QuantConfig(weight_bits=8, group_size=16), QuantConfig(weight_bits=4, group_size=16)]}
        >>> table = measure_grids(model, {"0": model[0]}, options, [torch.randn(64, 16)], OneShotQuantizationConfig(), progress=False)
        >>> [candidate.cost for candidate in table["0"]], table["0"][0].damage < table["0"][1].damage
        ([320, 192], True)
    """
    with eval_mode(model):
        damage = OutputChange(model, batches)
        table: dict[str, list[Candidate]] = {}

        def measure(group: Mapping[str, nn.Module], gram: InputGram | None) -> None:
            for name, layer in group.items():
                original = layer.weight.detach().clone()
                try:
                    table[name] = []
                    for grids in options[name]:
                        layer.weight.copy_(rounded_weight(original, grids, config, gram, name)[0])
                        table[name].append(Candidate(name, grids, damage(), weight_onnx_bytes(layer, grids)))
                finally:
                    layer.weight.copy_(original)

        tables = {name: layer for name, layer in layers.items() if isinstance(layer, nn.Embedding)}
        measure(tables, None)
        linear = {name: layer for name, layer in layers.items() if name not in tables}
        if linear:
            compress_layer_by_layer(model, linear, batches, measure, progress)
    return {name: table[name] for name in layers}


def weight_onnx_bytes(layer: nn.Module, quantization: QuantConfig | None = None) -> int:
    """The bytes the ONNX export writes for ``layer``'s weight: float32 without ``quantization``; on a symmetric
    weight-only grid (an ``nn.Embedding`` table's, or a linear layer's with ``group_size``), its integers (two a
    byte where they fit four bits) and a float32 scale an output channel (a table's row) and group of input
    columns, without zero points (all zero). The file adds the tensors' framing (names, shapes, length prefixes),
    a few bytes each, which this leaves out.

    Example:
        >>> weight_onnx_bytes(nn.Linear(384, 384), QuantConfig(weight_bits=4, group_size=128))
        78336
        >>> weight_onnx_bytes(nn.Embedding(30522, 384)), weight_onnx_bytes(nn.Embedding(30522, 384), QuantConfig(reduce_range=False))
        (46881792, 11842536)
    """
    weight = layer.weight
    if quantization is None:
        return weight.numel() * FLOAT_BYTES
    weight_only = isinstance(layer, nn.Embedding) or (isinstance(layer, nn.Linear) and quantization.group_size)
    if not weight_only or not quantization.symmetric:
        raise ValueError(
            f"weight_onnx_bytes counts symmetric weight-only grids (an nn.Embedding's, or an nn.Linear's with "
            f"group_size); got {quantization} for a {type(layer).__name__}"
        )
    from lightning_compress.deploy.qdq import stored_bits  # imports onnx

    integers = -(-weight.numel() * stored_bits(quantization.weight_range) // 8)
    groups = 1 if quantization.group_size is None else weight.shape[1] // quantization.group_size
    return integers + weight.shape[0] * groups * FLOAT_BYTES


def grid_config(layer: nn.Module, grid: Grid) -> QuantConfig | None:
    """The weight-only ``QuantConfig`` of ``grid`` on ``layer``, or ``None`` where it does not fit: a group size that
    does not divide a linear layer's input features, any group size for an embedding table (one scale a row).

    Example:
        >>> grid_config(nn.Linear(96, 8), (4, None)).group_size, grid_config(nn.Linear(96, 8), (4, 64))
        (96, None)
        >>> grid_config(nn.Embedding(10, 4), (8, None)).weight_range
        (-127, 127)
    """
    bits, group = grid
    if isinstance(layer, nn.Embedding):
        return None if group is not None else QuantConfig(weight_bits=bits, reduce_range=False, observer="minmax")
    size = layer.in_features if group is None else group
    return None if layer.in_features % size else QuantConfig(weight_bits=bits, group_size=size, observer="minmax")


def _fitting_grids(name: str, layer: nn.Module, grids: Sequence[Grid]) -> list[QuantConfig]:
    """The ``QuantConfig`` of each of ``grids`` that fits ``layer`` (see :func:`grid_config`); none raises."""
    fitting = [config for config in (grid_config(layer, grid) for grid in grids) if config is not None]
    if not fitting:
        raise ValueError(f"none of grids={list(grids)} fits {name} ({layer}): add a grid whose group size fits it")
    return fitting


def _check_budget(max_bytes: int, cheapest: int) -> None:
    if max_bytes < cheapest:
        raise ValueError(
            f"max_bytes={max_bytes!r} is below {cheapest:,}, the bytes of the cheapest plan (each layer on its "
            "cheapest grid): give at least that"
        )


def _is_grid(grid: object) -> bool:
    return (
        isinstance(grid, tuple | list)
        and len(grid) == 2
        and is_int(grid[0])
        and grid[0] in BITS
        and (grid[1] is None or (is_int(grid[1]) and grid[1] >= 1))
    )
