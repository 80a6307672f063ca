"""A one-shot method either finishes or leaves the model as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_compress.quantization.layers import QuantizedLayer, dequantize_layer


@contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Change ``model`` in place inside the block; if the block raises, the model's state dict and its layers'
    classes (a layer the block quantized is float again) are as they were before it, and the error goes on.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> before = layer.weight.detach().clone()
        >>> try:
        ...     with restored_on_error(layer):
        ...         _ = layer.weight.data.zero_()
        ...         raise ValueError("calibration batch 0 holds NaN")
        ... except ValueError:
        ...     pass
        >>> torch.equal(layer.weight, before)
        True
    """
    quantized_before = {name for name, module in model.named_modules() if isinstance(module, QuantizedLayer)}
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    try:
        yield
    except BaseException:
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLayer) and name not in quantized_before:
                dequantize_layer(module)
        with torch.no_grad():
            model.load_state_dict(state)
        raise
