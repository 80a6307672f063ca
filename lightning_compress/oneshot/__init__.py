"""One-shot compression from calibration data, layer by layer (plain PyTorch): Wanda and SparseGPT pruning,
the surviving weights of a mask solved exactly, GPTQ rounding; the ``OneShotPruning`` and ``OneShotQuantization``
callbacks."""

from lightning_compress.oneshot.callback import OneShotPruning, OneShotQuantization
from lightning_compress.oneshot.gptq import WeightGrid, gptq_quantize
from lightning_compress.oneshot.hessian import InputGram, inverse_hessian_factor, optimal_brain_surgeon
from lightning_compress.oneshot.layer_inputs import compress_layer_by_layer, layer_groups, token_positions
from lightning_compress.oneshot.pruning import METHODS, OneShotPruningConfig, one_shot_prune
from lightning_compress.oneshot.quantization import QUANTIZATION_METHODS, OneShotQuantizationConfig, one_shot_quantize
from lightning_compress.oneshot.reconstruction import reconstruct_surviving_weights
from lightning_compress.oneshot.sparsegpt import sparsegpt_prune
from lightning_compress.oneshot.wanda import row_masks, wanda_scores

__all__ = [
    "METHODS",
    "QUANTIZATION_METHODS",
    "InputGram",
    "OneShotPruning",
    "OneShotPruningConfig",
    "OneShotQuantization",
    "OneShotQuantizationConfig",
    "WeightGrid",
    "compress_layer_by_layer",
    "gptq_quantize",
    "inverse_hessian_factor",
    "layer_groups",
    "one_shot_prune",
    "one_shot_quantize",
    "optimal_brain_surgeon",
    "reconstruct_surviving_weights",
    "row_masks",
    "sparsegpt_prune",
    "token_positions",
    "wanda_scores",
]
