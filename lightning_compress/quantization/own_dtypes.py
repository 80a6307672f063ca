"""Modules whose state keeps its dtypes when the model around them changes precision."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class KeepsDtypes(nn.Module):
    """A module whose parameters and buffers keep their dtypes through ``.to(dtype)``, ``.half()``, ``.bfloat16()``
    and the like (those of its submodules too): only their device moves.

    Quantizer state is not model weights: a scale rounded to bfloat16 moves the grid, and a running count
    or sum in bfloat16 stops counting past 256. Lightning's ``precision="bf16-true"`` converts the whole
    model with ``.to(torch.bfloat16)``; the quantizers keep their float32 (and float64) state through it.

    Example:
        >>> import torch
        >>> class Counter(KeepsDtypes):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("total", torch.zeros((), dtype=torch.float64))
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), Counter()).to(torch.bfloat16)
        >>> model[0].weight.dtype, model[1].total.dtype
        (torch.bfloat16, torch.float64)
    """

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        def same_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)

        return super()._apply(same_dtype, recurse)
