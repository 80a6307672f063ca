"""One-shot quantization in plain PyTorch: GPTQ or round-to-nearest weights on the project's quantizers, their
activation ranges calibrated after, so the existing integer export writes the result."""

from __future__ import annotations

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
from lightning_compress.quantization.calibration import calibrate
from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.fake_quant import FakeQuantizer
from lightning_compress.quantization.layers import QuantizedLayer, quantize_model, set_quantization
from lightning_compress.targets import TargetSpec

QUANTIZATION_METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class OneShotQuantizationConfig:
    """How :func:`one_shot_quantize` rounds: ``"gptq"`` (with ``act_order``, ``damping``, ``block_size``) or
    ``"rtn"`` (round-to-nearest: the weight quantizers' own grids, as post-training quantization), on the
    grids of ``quantization`` (a :class:`~lightning_compress.quantization.QuantConfig`: weight bits and
    symmetry, one scale per output channel, or per output channel and group of ``group_size`` input columns
    with the inputs left in float; its activation settings calibrate the inputs), for the targeted linear
    layers; checked when made.

    Example:
        >>> OneShotQuantizationConfig(quantization=QuantConfig(weight_bits=4)).quantization.weight_range
        (-7, 7)
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

    def __post_init__(self) -> None:
        check_argument(
            "method", self.method, self.method in QUANTIZATION_METHODS, f"one of {', '.join(QUANTIZATION_METHODS)}"
        )
        quantization = self.quantization
        check_argument(
            "quantization",
            quantization,
            isinstance(quantization, QuantConfig) and quantization.per_channel and not quantization.learnable_scales,
            "a QuantConfig with per_channel=True and learnable_scales=False (one-shot rounding fixes one grid per output channel)",
        )
        check_argument("damping", self.damping, is_number(self.damping) and self.damping >= 0, "a number >= 0")
        check_argument("block_size", self.block_size, is_int(self.block_size) and self.block_size >= 1, "an int >= 1")


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
    """Quantize the linear layers of ``model`` in place from the first ``calibration_batches`` of ``batches``;
    returns the quantized layers by name.

    The layers become the project's quantized layers (:func:`~lightning_compress.quantization.quantize_model`).
    With GPTQ they are visited in forward order, in float, each rounded from its inputs as the layers rounded
    before it compute them; then every activation range is calibrated on the same batches
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
    layers = quantize_targets(model, config, warn)
    weight = next(iter(layers.values())).weight
    inputs = calibration_inputs(batches, calibration_batches, weight.device, weight.dtype)
    grids: dict[str, WeightGrid] = {}
    if config.method == "gptq":

        def round_group(group: Mapping[str, nn.Linear], gram: InputGram) -> None:
            for name, layer in group.items():
                quantization = config.quantization
                grid = WeightGrid.of(
                    layer.weight, quantization.weight_range, quantization.symmetric, quantization.group_size
                )
                layer.weight.copy_(
                    gptq_quantize(
                        layer.weight, gram.matrix, grid, config.damping, name, config.act_order, config.block_size
                    )
                )
                grids[name] = grid

        set_quantization(model, enabled=False)
        compress_layer_by_layer(model, layers, inputs, round_group, progress)
        if share is not None:
            shared = share({name: layer.weight.detach() for name, layer in layers.items()})
            for name, layer in layers.items():
                layer.weight.copy_(shared[name])
    calibrate(model, inputs)
    for name, grid in grids.items():
        _keep_grid(layers[name].weight_quantizer, grid)
    return layers


def quantize_targets(
    model: nn.Module, config: OneShotQuantizationConfig, warn: Callable[[str], Any] = warnings.warn
) -> dict[str, QuantizedLayer]:
    """Make ``config``'s target layers of ``model`` (every ``nn.Linear`` by default) quantized layers on its grids,
    quantization off, in place; fails unless every target is an ``nn.Linear``. Returns them by name.

    Example:
        >>> from torch import nn
        >>> sorted(quantize_targets(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), OneShotQuantizationConfig()))
        ['0', '2']
    """
    targets = [nn.Linear] if config.targets is None else config.targets
    layers = quantize_model(model, config.quantization, targets, config.exclude, warn)
    not_linear = {name: type(layer).__name__ for name, layer in layers.items() if not isinstance(layer, nn.Linear)}
    if not_linear:
        raise ValueError(f"one-shot quantization rounds nn.Linear layers; the targets also name {not_linear}")
    return layers


def _keep_grid(quantizer: FakeQuantizer, grid: WeightGrid) -> None:
    """Fix ``quantizer``'s scale and zero point to ``grid``'s (one a channel, or a channel and group of columns,
    row by row as the quantizer holds them) and stop it observing."""
    quantizer.scale.copy_(grid.scale.reshape(-1))
    quantizer.zero_point.copy_(grid.zero_point.reshape(-1))
    quantizer.observing.fill_(False)
