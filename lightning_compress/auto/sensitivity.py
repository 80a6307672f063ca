"""What each setting of each layer would cost in accuracy and save in bytes, measured one layer at a time.

For every targeted layer and every :class:`~lightning_compress.auto.settings.LayerSetting` it may take next,
the layer alone is compressed further as the setting says and the model's outputs on a few calibration
batches are compared with its outputs before: the damage is the mean KL divergence of the predictions from
the model's own (what recovery then has to win back). The cost is the bytes of the compressed weight in the
compressed format. The layer gets its weight back after each setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_compress.auto.settings import LayerSetting, compressed_weight, prune_mask
from lightning_compress.batches import ModelInputs, call_model, output_logits
from lightning_compress.deploy.compressed import tensor_bytes
from lightning_compress.distillation.losses import kd_loss
from lightning_compress.modules import eval_mode
from lightning_compress.quantization.config import QuantConfig


@dataclass(frozen=True)
class Candidate:
    """One setting of one layer: its predicted ``damage`` (KL divergence from the dense model's predictions)
    and ``cost`` (bytes of the layer's weight in the compressed format). The allocation reads the layer, the
    damage and the cost alone; the setting is carried: a :class:`LayerSetting`, or a layer's grids (a
    ``QuantConfig``) for :func:`~lightning_compress.auto.post_training.allocate_bits`, whose damage and cost
    are its own.

    Example:
        >>> Candidate("fc1", LayerSetting(0.9, 4), damage=0.012, cost=18_304).setting.clusters
        16
    """

    layer: str
    setting: LayerSetting | QuantConfig
    damage: float
    cost: int


@torch.no_grad()
def measure_candidates(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    settings: Mapping[str, Sequence[LayerSetting]],
    batches: Sequence[ModelInputs],
    seed: int = 0,
) -> dict[str, list[Candidate]]:
    """Each layer of ``layers`` (name -> module of ``model``) at each of its ``settings``, measured alone on the
    inputs ``batches`` against ``model``'s own predictions; by layer name. A layer's first setting is where its
    weight stands (damage 0, its bytes as it is); the others compress it further from there. ``model`` is
    unchanged afterwards.

    Example:
        >>> from lightning_compress.auto.settings import next_settings
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> settings = {"0": next_settings("pruning", LayerSetting(), model[0].weight.shape)}
        >>> table = measure_candidates(model, {"0": model[0]}, settings, [torch.randn(32, 8)])
        >>> [(c.setting.sparsity, c.cost) for c in table["0"][:3]]
        [(0.0, 512), (0.5, 272), (0.7, 167)]
        >>> table["0"][0].damage
        0.0
    """
    with eval_mode(model):
        damage = PredictionDamage(model, batches)
        table: dict[str, list[Candidate]] = {}
        for name, layer in layers.items():
            original = layer.weight.detach().clone()
            current, *further = settings[name]
            table[name] = [Candidate(name, current, 0.0, tensor_bytes(original))]
            masks: dict[float, torch.Tensor] = {}  # by sparsity: each is ranked once, whatever its bits
            try:
                for setting in further:
                    if setting.sparsity not in masks:
                        masks[setting.sparsity] = prune_mask(original, setting.sparsity)
                    compressed = compressed_weight(original, setting, seed, masks[setting.sparsity])
                    layer.weight.copy_(compressed)
                    table[name].append(Candidate(name, setting, damage(), tensor_bytes(compressed)))
            finally:
                layer.weight.copy_(original)
    return table


class PredictionDamage:
    """How far ``model``'s predictions on ``batches`` have moved from what they were when this was made: the mean KL
    divergence over the batches, each time it is called (run it with the model in eval mode).

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> damage = PredictionDamage(model, [torch.randn(8, 4)])
        >>> damage()
        0.0
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(-1.0)
        >>> damage() > 0
        True
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, batches: Sequence[ModelInputs]) -> None:
        self.model, self.batches = model, batches
        self.reference = [output_logits(call_model(model, inputs)).float() for inputs in batches]

    @torch.no_grad()
    def __call__(self) -> float:
        divergences = [
            kd_loss(output_logits(call_model(self.model, inputs)), before, temperature=1.0).item()
            for inputs, before in zip(self.batches, self.reference)
        ]
        return max(0.0, sum(divergences) / len(divergences))
