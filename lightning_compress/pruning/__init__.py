"""Pruning: settings, importance criteria, masks, schedules and the Pruner (plain PyTorch), and the ``Pruning`` callback."""

from lightning_compress.pruning.callback import Pruning
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.criteria import (
    CRITERIA,
    channel_scores,
    element_scores,
    taylor_scores,
)
from lightning_compress.pruning.masks import (
    forget_pruned,
    n_of_m_masks,
    rank_masks,
    threshold_masks,
)
from lightning_compress.pruning.pruner import Pruner, prune_
from lightning_compress.pruning.schedules import SCHEDULES, SparsitySchedule
from lightning_compress.targets import select_layers

__all__ = [
    "CRITERIA",
    "SCHEDULES",
    "Pruner",
    "Pruning",
    "PruningConfig",
    "SparsitySchedule",
    "channel_scores",
    "element_scores",
    "forget_pruned",
    "n_of_m_masks",
    "prune_",
    "rank_masks",
    "select_layers",
    "taylor_scores",
    "threshold_masks",
]
