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

from lightning_compress.auto.settings import LayerSetting, compressed_weight
from lightning_compress.batches import ModelInputs, call_model, output_logits
from lightning_compress.deploy.compressed import tensor_bytes
from lightning_compress.distillation.losses import kd_loss
from lightning_compress.modules import eval_mode


@dataclass(frozen=True)
class Candidate:
    """One setting of one layer: its predicted ``damage`` (KL divergence from the dense model's predictions)
    and ``cost`` (bytes of the layer's weight in the compressed format).

    Example:
        >>> Candidate("fc1", LayerSetting(0.9, 4), damage=0.012, cost=18_304).setting.clusters
        16
    """

    layer: str
    setting: LayerSetting
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
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> settings = {"0": next_settings("pruning", LayerSetting(), model[0].weight.shape)}
        >>> table = measure_candidates(model, {"0": model[0]}, settings, [torch.randn(32, 8)])
        >>> [(c.setting.sparsity, c.cost) for c in table["0"][:3]]
        [(0.0, 512), (0.5, 272), (0.7, 167)]
        >>> table["0"][0].damage
        0.0
    """
    with eval_mode(model):
        reference = [output_logits(call_model(model, inputs)).float() for inputs in batches]
        table: dict[str, list[Candidate]] = {}
        for name, layer in layers.items():
            original = layer.weight.detach().clone()
            current, *further = settings[name]
            table[name] = [Candidate(name, current, 0.0, tensor_bytes(original))]
            try:
                for setting in further:
                    compressed = compressed_weight(original, setting, seed)
                    layer.weight.copy_(compressed)
                    table[name].append(
                        Candidate(name, setting, _damage(model, batches, reference), tensor_bytes(compressed))
                    )
            finally:
                layer.weight.copy_(original)
    return table


def _damage(model: nn.Module, batches: Sequence[ModelInputs], reference: list[torch.Tensor]) -> float:
    """The mean KL divergence of ``model``'s predictions from ``reference`` over ``batches``."""
    divergences = [
        kd_loss(output_logits(call_model(model, inputs)), dense, temperature=1.0).item()
        for inputs, dense in zip(batches, reference)
    ]
    return max(0.0, sum(divergences) / len(divergences))
