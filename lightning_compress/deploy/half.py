"""Half precision for inference: the whole model in float16 or bfloat16, in one call."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.modules import model_copy
from lightning_compress.quantization.layers import quantized_layers

HALF_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def half_precision(model: nn.Module, dtype: str = "float16") -> nn.Module:
    """A copy of ``model`` for inference, in eval mode, with every floating parameter and buffer in 16 bits.

    Half the bytes of float32; feed it inputs of the same dtype (``evaluate_accuracy`` and
    ``profile_model`` do). The original model is left as it was.

    Example:
        >>> import torch
        >>> half = half_precision(torch.nn.Linear(4, 2), "bfloat16")
        >>> half.weight.dtype, half.training
        (torch.bfloat16, False)
    """
    if dtype not in HALF_DTYPES:
        raise ValueError(f"half precision is one of {', '.join(HALF_DTYPES)} (16 bits), got {dtype!r}")
    if quantized_layers(model):
        raise ValueError("the model is fake-quantized to integers already; convert a float model to half precision")
    return model_copy(model).to(HALF_DTYPES[dtype]).eval()
