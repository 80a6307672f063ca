"""Whole channels for :class:`~lightning_compress.AutoCompression`'s ``macs`` objective: pruned as masks over every
tensor they touch (so the masked model computes what the smaller one will), counted in the multiply-accumulates
the model has once they are removed, and removed for real with Torch-Pruning at the end.

A layer here is a channel group of :class:`~lightning_compress.pruning.structured.ChannelGroups`, named by its root
layer: pruning ``channels`` of its output channels (by the L2 norm of everything they touch, a pruned channel never
revived) also removes them from BatchNorm and from the input of every layer that reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.auto.settings import LayerSetting
from lightning_compress.batches import ModelInputs, call_model
from lightning_compress.modules import WEIGHT_LAYER_TYPES, eval_mode
from lightning_compress.pruning.structured import ChannelGroups

#: Fractions of a group's output channels that may be pruned (those that would empty it are left out per group).
CHANNEL_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
#: How the channels of a group are ranked (see ``ChannelGroups.scores``).
CHANNEL_CRITERION = "l2"


@torch.no_grad()
def layer_macs(model: nn.Module, example_input: ModelInputs) -> tuple[dict[str, int], int]:
    """Each weight layer's multiply-accumulates in one forward pass on ``example_input`` (torch's
    ``FlopCounterMode``, one MAC = two FLOPs), by module name, and the model's MACs outside them.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> layer_macs(model, torch.zeros(2, 8))
        ({'0': 256, '2': 128}, 0)
    """
    with eval_mode(model), FlopCounterMode(display=False) as counter:
        call_model(model, example_input)
    counts, prefix = counter.get_flop_counts(), type(model).__name__
    layers = {
        name: sum(counts.get(f"{prefix}.{name}", {}).values()) // 2
        for name, module in model.named_modules()
        if isinstance(module, WEIGHT_LAYER_TYPES)
    }
    return layers, counter.get_total_flops() // 2 - sum(layers.values())


def pruned_macs(macs: Mapping[str, int], other: int, masks: Mapping[str, torch.Tensor]) -> int:
    """The MACs of a model whose masked channels are removed: each weight layer's ``macs`` (dense, by name) times
    the fractions of its output and input channels ``masks`` (over parameters, by name) keep, plus ``other``.

    Example:
        >>> mask = torch.ones(4, 6, dtype=torch.bool)
        >>> mask[:2] = False  # two of four output channels
        >>> pruned_macs({"fc": 240}, 10, {"fc.weight": mask})
        130
    """
    total = other
    for name, count in macs.items():
        mask = masks.get(f"{name}.weight")
        if mask is None:
            total += count
            continue
        rows = mask.flatten(1).any(dim=1)
        columns = mask.transpose(0, 1).flatten(1).any(dim=1)
        total += round(count * rows.float().mean().item() * columns.float().mean().item())
    return total


def channel_settings(current: LayerSetting, units: int) -> list[LayerSetting]:
    """``current`` and the larger fractions of :data:`CHANNEL_FRACTIONS` of a group of ``units`` channels, each a
    different count of whole channels, at least one kept (in ``current``'s bits).

    Example:
        >>> [s.channels for s in channel_settings(LayerSetting(channels=0.5), units=4)]
        [0.5, 0.75]
    """
    counts = sorted({round(fraction * units) for fraction in CHANNEL_FRACTIONS})
    pruned = round(current.channels * units)
    further = (LayerSetting(bits=current.bits, channels=count / units) for count in counts if pruned < count < units)
    return [current, *further]


class ChannelMasks:
    """The pruned channels of each group (by root layer name) and the masks they put on the model's parameters,
    applied and kept through training.

    :meth:`apply` prunes each group to its setting's fraction from where it is (pruned channels stay pruned),
    :meth:`keep` zeroes what they touch (after each optimizer step), :meth:`share_gradients` zeroes its
    gradients (before each step); :meth:`remove` cuts them out of the model.

    Example:
        >>> from lightning_compress.models import SmallCNN
        >>> model = SmallCNN(num_classes=10, image_size=8)
        >>> layers = {"features.0": model.features[0], "features.4": model.features[4]}
        >>> channels = ChannelMasks(model, torch.zeros(1, 1, 8, 8), layers)
        >>> channels.apply({"features.0": LayerSetting(channels=0.5)})
        >>> int((model.features[0].weight.flatten(1).abs().sum(1) == 0).sum()), model.features[4].weight[:, 16:].any().item()
        (16, True)
    """

    def __init__(self, model: nn.Module, example_input: ModelInputs, layers: Mapping[str, nn.Module]) -> None:
        self.groups = ChannelGroups(model, example_input, dict(layers))
        self.parameters = dict(model.named_parameters())
        self.kept: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}

    @property
    def units(self) -> dict[str, int]:
        """The output channels of each group, by root layer name."""
        return self.groups.units

    def kept_channels(self, group: str, setting: LayerSetting) -> torch.Tensor:
        """The channels of ``group`` kept at ``setting``: the highest-ranked, none of those pruned before."""
        scores = self.groups.scores(CHANNEL_CRITERION)[group]
        pruned_before = self.kept.get(group)
        if pruned_before is not None:
            scores = scores.masked_fill(~pruned_before, float("-inf"))
        kept = torch.zeros(scores.numel(), dtype=torch.bool)
        kept[torch.topk(scores, scores.numel() - round(setting.channels * scores.numel())).indices] = True
        return kept

    @torch.no_grad()
    def apply(self, plan: Mapping[str, LayerSetting]) -> None:
        """Prune each named group to its setting's fraction of channels."""
        for group, setting in plan.items():
            self.kept[group] = self.kept_channels(group, setting)
        self.masks = self.groups.masks(self.kept)
        self.keep()

    @torch.no_grad()
    def keep(self) -> None:
        """Zero every parameter entry a pruned channel touches."""
        for name, parameter in self.parameters.items():
            if name in self.masks:
                parameter.mul_(self.masks[name])

    @torch.no_grad()
    def share_gradients(self) -> None:
        """Zero the gradients of what the pruned channels touch."""
        for name, parameter in self.parameters.items():
            if name in self.masks and parameter.grad is not None:
                parameter.grad.mul_(self.masks[name])

    def remove(self) -> None:
        """Cut the pruned channels out of the model: smaller layers, the same outputs. ``kept`` and ``masks`` stay
        as the record of what was cut; nothing is applied or kept afterwards."""
        self.groups.remove(self.kept)
        self.parameters = {}

    def state_dict(self) -> dict[str, Any]:
        return {"kept": {group: kept.clone() for group, kept in self.kept.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kept = dict(state["kept"])
        self.masks = self.groups.masks(self.kept)


@torch.no_grad()
def measure_channel_candidates(
    channels: ChannelMasks, settings: Mapping[str, Sequence[LayerSetting]], damage: Callable[[], float]
) -> dict[str, list[tuple[LayerSetting, float, dict[str, torch.Tensor]]]]:
    """Each group at each of its ``settings``, alone, from where ``channels`` stands: ``(setting, damage, the kept
    channels of every group)``, by group, with ``damage()`` called while the group's further channels are
    masked. The model is unchanged afterwards."""
    table: dict[str, list[tuple[LayerSetting, float, dict[str, torch.Tensor]]]] = {}
    for group, (current, *further) in settings.items():
        table[group] = [(current, 0.0, dict(channels.kept))]
        for setting in further:
            kept = {**channels.kept, group: channels.kept_channels(group, setting)}
            masks = channels.groups.masks(kept)
            originals = {name: channels.parameters[name].detach().clone() for name in masks}
            try:
                for name, mask in masks.items():
                    channels.parameters[name].mul_(mask)
                table[group].append((setting, damage(), kept))
            finally:
                for name, original in originals.items():
                    channels.parameters[name].copy_(original)
    return table
