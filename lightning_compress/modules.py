"""What every floor of the library does to a model: copy it, put it in eval mode for a while, find its weight layers.

The leaves of the import graph: measurement, the compression methods and deployment all import them,
and this module imports nothing of the library.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: Layers whose ``weight`` the sparsity statistics (and the compression methods) look at.
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


def model_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares, rather than copies, the Trainer a LightningModule is attached to."""
    trainer = getattr(model, "_trainer", None)
    return copy.deepcopy(model, memo={id(trainer): trainer} if trainer is not None else None)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and give every submodule back the mode it had (a frozen part stays frozen)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def weight_layers(
    model: nn.Module, layer_types: tuple[type[nn.Module], ...] = WEIGHT_LAYER_TYPES
) -> Iterator[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``layer_types`` with a weight, each weight tensor once.

    A weight shared by two layers (tied embeddings, a reused block) is yielded under the first name only.
    """
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, layer_types) and isinstance(weight, torch.Tensor) and id(weight) not in seen:
            seen.add(id(weight))
            yield name, module
