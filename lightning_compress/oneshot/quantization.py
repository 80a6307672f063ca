"""One-shot quantization in plain PyTorch: GPTQ or round-to-nearest weights on the project's quantizers (one grid
for every targeted layer, or each layer its own), their activation ranges calibrated after, so the existing integer
export writes the result."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.arguments import check_argument, is_int, is_number
from lightning_compress.finiteness import require_finite
from lightning_compress.oneshot.gptq import WeightGrid, gptq_quantize
from lightning_compress.oneshot.hessian import BLOCK_SIZE, DAMPING, InputGram
from lightning_compress.oneshot.layer_inputs import calibration_inputs, compress_layer_by_layer
from lightning_compress.oneshot.rollback import restored_on_error
from lightning_compress.quantization.calibration import calibrate
from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.fake_quant import FakeQuantizer
from lightning_compress.quantization.layers import QuantizedLayer, check_groups, quantize_layer, set_quantization
from lightning_compress.targets import TargetSpec, explicit_fused_attention, select_layers, warn_if_few_targeted

QUANTIZATION_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class OneShotQuantizationConfig:
    """How :func:`one_shot_quantize` rounds: ``"gptq"`` (with ``act_order``, ``damping``, ``block_size``) or
    ``"rtn"`` (round-to-nearest: the weight quantizers' own grids, as post-training quantization), on the
    grids of ``quantization`` (a :class:`~lightning_compress.quantization.QuantConfig`: weight bits and
    symmetry, one scale per output channel, or per output channel and group of ``group_size`` input columns
    with the inputs left in float; its activation settings calibrate the inputs), for the targeted linear
    layers; checked when made.

    ``layer_quantization`` gives named layers grids of their own (layer name -> ``QuantConfig``, as a
    mixed-precision plan does), ``quantization``'s for the other targets. Without ``targets`` the named layers are
    the targets, linear layers and embedding tables alike; with ``targets``, each name must be a targeted layer.
    An ``nn.Embedding`` table is rounded to nearest, one grid a row, before the linear layers are visited (a
    lookup's inputs are one-hot, so GPTQ's update would move nothing): name it, or its type in ``targets``.

    Example:
        >>> OneShotQuantizationConfig(quantization=QuantConfig(weight_bits=4)).quantization.weight_range
        (-7, 7)
        >>> OneShotQuantizationConfig(layer_quantization={"fc": QuantConfig(weight_bits=8, group_size=64)}).layer_quantization["fc"].weight_bits
        8
        >>> OneShotQuantizationConfig(method="awq")
        Traceback (most recent call last):
        ...
        ValueError: method must be one of gptq, rtn; got 'awq' (str)
    """

    method: str = "gptq"
    quantization: QuantConfig = field(default_factory=lambda: QuantConfig(weight_bits=4, observer="minmax"))
    act_order: bool = False
    targets: TargetSpec = None
    exclude: TargetSpec = None
    damping: float = DAMPING
    block_size: int = BLOCK_SIZE
    layer_quantization: Mapping[str, QuantConfig] | None = None

    def __post_init__(self) -> None:
        check_argument(
            "method", self.method, self.method in QUANTIZATION_METHODS, f"one of {', '.join(QUANTIZATION_METHODS)}"
        )
        _check_grids("quantization", self.quantization)
        own = self.layer_quantization
        check_argument(
            "layer_quantization",
            own,
            own is None or (isinstance(own, Mapping) and bool(own) and all(isinstance(name, str) for name in own)),
            "None or a non-empty dict of layer name -> QuantConfig",
        )
        for name, grids in (own or {}).items():
            _check_grids(f"layer_quantization[{name!r}]", grids)
        check_argument("damping", self.damping, is_number(self.damping) and self.damping >= 0, "a number >= 0")
        check_argument("block_size", self.block_size, is_int(self.block_size) and self.block_size >= 1, "an int >= 1")


def _check_grids(name: str, quantization: object) -> None:
    check_argument(
        name,
        quantization,
        isinstance(quantization, QuantConfig) and quantization.per_channel and not quantization.learnable_scales,
        "a QuantConfig with per_channel=True and learnable_scales=False (one-shot rounding fixes one grid per output channel)",
    )


@torch.no_grad()
def one_shot_quantize(
    model: nn.Module,
    batches: Iterable[Any],
    config: OneShotQuantizationConfig,
    calibration_batches: int | None = None,
    *,
    progress: bool = True,
    share: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    warn: Callable[[str], Any] = warnings.warn,
) -> dict[str, QuantizedLayer]:
    """Quantize the targeted layers of ``model`` (see :func:`quantize_targets`) in place from the first
    ``calibration_batches`` of ``batches``; returns the quantized layers by name.

    The layers become the project's quantized layers (:func:`~lightning_compress.quantization.quantize_model`),
    each on its own grids where ``config.layer_quantization`` names it. With GPTQ the embedding tables are rounded
    to nearest first and the linear layers visited in forward order, in float, each rounded from its inputs as
    the layers rounded before it compute them; then every activation range is calibrated on the same batches
    (:func:`~lightning_compress.quantization.calibrate`) and each weight quantizer keeps the grid its weight was
    rounded to (``observing`` off), so fake quantization leaves the rounded weights as they are and the
    integer export (8 or 4 bits) writes them. ``share`` passes the rounded weights through (DDP: rank zero's
    to every rank).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> layers = one_shot_quantize(model, [torch.randn(32, 8) for _ in range(4)], OneShotQuantizationConfig(), progress=False)
        >>> sorted(layers), model[0].weight_quantizer.quant_range
        (['0', '2'], (-7, 7))
    """
    require_finite(
        dict(model.named_parameters()), f"One-shot quantization ({config.method}) rounds and runs the parameters"
    )
    with restored_on_error(model):  # a failure leaves the model as it was
        layers = quantize_targets(model, config, warn)
        weight = next(iter(layers.values())).weight
        inputs = calibration_inputs(batches, calibration_batches, weight.device, weight.dtype)
        grids: dict[str, WeightGrid] = {}
        if config.method == "gptq":

            def round_group(group: Mapping[str, QuantizedLayer], gram: InputGram | None) -> None:
                for name, layer in group.items():
                    rounded, grids[name] = rounded_weight(layer.weight, layer.quant_config, config, gram, name)
                    layer.weight.copy_(rounded)

            set_quantization(model, enabled=False)
            tables = {name: layer for name, layer in layers.items() if isinstance(layer, nn.Embedding)}
            round_group(tables, None)
            linear = {name: layer for name, layer in layers.items() if name not in tables}
            if linear:
                compress_layer_by_layer(model, linear, inputs, round_group, progress)
            if share is not None:
                shared = share({name: layer.weight.detach() for name, layer in layers.items()})
                for name, layer in layers.items():
                    layer.weight.copy_(shared[name])
        calibrate(model, inputs)
        for name, grid in grids.items():
            _keep_grid(layers[name].weight_quantizer, grid)
    return layers


@torch.no_grad()
def rounded_weight(
    weight: torch.Tensor,
    quantization: QuantConfig,
    config: OneShotQuantizationConfig,
    gram: InputGram | None,
    name: str,
) -> tuple[torch.Tensor, WeightGrid]:
    """``weight`` rounded onto ``quantization``'s min-max grids, and the grids: by GPTQ from the layer's input
    ``gram`` with ``config``'s settings (``name`` names the layer in its errors), or to nearest without a ``gram``
    (an embedding table) or with ``config.method="rtn"``.

    Example:
        >>> weight = torch.tensor([[7.0, -3.2, 2.9, 14.0]])
        >>> rounded, grid = rounded_weight(weight, QuantConfig(weight_bits=4), OneShotQuantizationConfig(), None, "fc")
        >>> rounded.tolist()
        [[8.0, -4.0, 2.0, 14.0]]
    """
    grid = WeightGrid.of(weight, quantization.weight_range, quantization.symmetric, quantization.group_size)
    if gram is None or config.method == "rtn":
        return grid.round(weight).to(weight.dtype), grid
    rounded = gptq_quantize(weight, gram.matrix, grid, config.damping, name, config.act_order, config.block_size)
    return rounded, grid


def quantize_targets(
    model: nn.Module, config: OneShotQuantizationConfig, warn: Callable[[str], Any] = warnings.warn
) -> dict[str, QuantizedLayer]:
    """Make ``config``'s target layers of ``model`` quantized layers on their grids (``config.layer_quantization``'s
    for the layers it names, ``config.quantization``'s for the others), quantization off, in place. The targets are
    every ``nn.Linear`` by default, or the layers ``layer_quantization`` names; each must be an ``nn.Linear`` or an
    ``nn.Embedding`` whose grids fit it, and each name a targeted layer, else ``ValueError`` before any layer
    changes. Returns them by name.

    Example:
        >>> from torch import nn
        >>> sorted(quantize_targets(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), OneShotQuantizationConfig()))
        ['0', '2']
        >>> config = OneShotQuantizationConfig(layer_quantization={"1": QuantConfig(weight_bits=8)})
        >>> quantize_targets(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), config)
        Traceback (most recent call last):
        ...
        ValueError: layer_quantization names ['1'], which are not targeted linear layers or embedding tables of Sequential; near names: ['0', '2']
    """
    own = config.layer_quantization or {}
    selected = target_layers(model, config)
    grids = {name: own.get(name, config.quantization) for name in selected}
    for name, layer in selected.items():
        check_groups(layer, grids[name], name)
        if isinstance(layer, QuantizedLayer) and layer.quant_config != grids[name]:
            raise ValueError(f"{name} is already quantized on other grids ({layer.quant_config}) than {grids[name]}")
    explicit_fused_attention(model, "Quantization", warn)
    warn_if_few_targeted(model, selected, "Quantization", warn)
    return {name: quantize_layer(layer, grids[name]) for name, layer in selected.items()}


def target_layers(model: nn.Module, config: OneShotQuantizationConfig) -> dict[str, nn.Module]:
    """The layers of ``model`` that ``config`` targets, by name: every ``nn.Linear`` by default, or the layers
    ``config.layer_quantization`` names. A name there that is not a targeted layer, or a target that is not an
    ``nn.Linear`` or ``nn.Embedding``, raises ``ValueError``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> list(target_layers(model, OneShotQuantizationConfig())), list(target_layers(model, OneShotQuantizationConfig(layer_quantization={"0": QuantConfig()})))
        (['1', '2'], ['0'])
    """
    own = config.layer_quantization or {}
    if config.targets is None and own:
        candidates = select_layers(model, [nn.Linear, nn.Embedding], config.exclude)
        selected = {name: candidates[name] for name in own if name in candidates}
    else:
        targets = [nn.Linear] if config.targets is None else config.targets
        candidates = selected = select_layers(model, targets, config.exclude)
    unknown = [name for name in own if name not in selected]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(candidates), n=5, cutoff=0.3) or list(candidates)[:5]
        raise ValueError(
            f"layer_quantization names {unknown}, which are not targeted linear layers or embedding tables of "
            f"{type(model).__name__}; near names: {near}"
        )
    unsupported = {
        name: type(layer).__name__
        for name, layer in selected.items()
        if type(layer) not in (nn.Linear, nn.Embedding) and not isinstance(layer, QuantizedLayer)
    }
    if unsupported:
        raise ValueError(
            f"one-shot quantization rounds nn.Linear layers; the targets also name {unsupported} (plain nn.Linear "
            "layers and nn.Embedding tables are rounded)"
        )
    return selected


def _keep_grid(quantizer: FakeQuantizer, grid: WeightGrid) -> None:
    """Fix ``quantizer``'s scale and zero point to ``grid``'s (one a channel, or a channel and group of columns,
    row by row as the quantizer holds them) and stop it observing."""
    quantizer.scale.copy_(grid.scale.reshape(-1))
    quantizer.zero_point.copy_(grid.zero_point.reshape(-1))
    quantizer.observing.fill_(False)
