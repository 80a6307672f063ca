"""One-shot compression from calibration data: Wanda and SparseGPT pruning, layer by layer (plain PyTorch),
and the ``OneShotPruning`` callback."""

from lightning_compress.oneshot.callback import OneShotPruning
from lightning_compress.oneshot.hessian import InputGram, inverse_hessian_factor
from lightning_compress.oneshot.layer_inputs import compress_layer_by_layer, layer_groups, token_positions
from lightning_compress.oneshot.pruning import METHODS, OneShotPruningConfig, one_shot_prune
from lightning_compress.oneshot.sparsegpt import sparsegpt_prune
from lightning_compress.oneshot.wanda import row_masks, wanda_scores

__all__ = [
    "METHODS",
    "InputGram",
    "OneShotPruning",
    "OneShotPruningConfig",
    "compress_layer_by_layer",
    "inverse_hessian_factor",
    "layer_groups",
    "one_shot_prune",
    "row_masks",
    "sparsegpt_prune",
    "token_positions",
    "wanda_scores",
]
