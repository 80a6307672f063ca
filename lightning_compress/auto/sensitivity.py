"""What each setting of each layer would cost in accuracy and save in bytes, measured one layer at a time.

For every targeted layer and every :class:`~lightning_compress.auto.settings.LayerSetting` it allows, the
layer alone is compressed as the setting says and the model's outputs on a few calibration batches are
compared with the dense model's: the damage is the mean KL divergence of the compressed model's
predictions from the dense model's (what distillation from the dense teacher then has to recover). The
cost is the bytes of the compressed weight in the compressed format. The layer gets its weight back
after each setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from rich.progress import Progress
from torch import nn

from lightning_compress.auto.settings import LayerSetting, compressed_weight, layer_settings
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
    methods: Sequence[str],
    batches: Sequence[ModelInputs],
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[Candidate]]:
    """Every setting of ``methods`` of every layer of ``layers`` (name -> module of ``model``), measured alone
    on the inputs ``batches``; by layer name, the dense setting first. ``model`` is unchanged afterwards.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> table = measure_candidates(model, {"0": model[0]}, ["pruning"], [torch.randn(32, 8)])
        >>> [(c.setting.sparsity, c.cost) for c in table["0"][:3]]
        [(0.0, 512), (0.5, 272), (0.7, 167)]
        >>> table["0"][0].damage
        0.0
    """
    with eval_mode(model):
        reference = [output_logits(call_model(model, inputs)).float() for inputs in batches]
        table: dict[str, list[Candidate]] = {}
        settings = {name: layer_settings(methods, layer.weight.shape) for name, layer in layers.items()}
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("compression sensitivity", total=sum(map(len, settings.values())))
            for name, layer in layers.items():
                original = layer.weight.detach().clone()
                try:
                    table[name] = []
                    for setting in settings[name]:
                        compressed = original if setting.dense else compressed_weight(original, setting, seed)
                        layer.weight.copy_(compressed)
                        damage = 0.0 if setting.dense else _damage(model, batches, reference)
                        table[name].append(Candidate(name, setting, damage, tensor_bytes(compressed)))
                        bar.advance(task)
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
