"""Post-training calibration: observe activation ranges on a few batches, without training, then quantize."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_compress.batches import call_model, model_inputs, placed_like
from lightning_compress.finiteness import require_finite, require_finite_batch
from lightning_compress.modules import eval_mode
from lightning_compress.quantization.fake_quant import FakeQuantizer
from lightning_compress.quantization.layers import quantizers, set_quantization


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> int:
    """Observe the ranges of a quantized model on ``batches`` and switch fake quantization on; returns the batches used.

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off) with only its
    quantizers in training mode, so they observe; their earlier observations are forgotten first.
    Afterwards the observers are frozen and fake quantization is on. A batch is a tensor of inputs, a
    sequence whose first item is the inputs (``(inputs, targets)`` from a dataloader), or a dict in Hugging
    Face's convention (every tensor but ``labels`` a keyword argument of the model).

    Example:
        >>> import torch
        >>> from lightning_compress.quantization import QuantConfig, quantize_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> _ = quantize_model(model, QuantConfig(observer="minmax"))
        >>> calibrate(model, [torch.randn(8, 4) for _ in range(3)])
        3
        >>> bool(model[0].input_quantizer.enabled)
        True
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1 or None (every batch), got {num_batches}")
    first = next(model.parameters())
    used = 0
    with eval_mode(model):
        for quantizer in start_calibration(model):
            quantizer.train()
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            inputs = placed_like(model_inputs(batch), first.device, first.dtype)
            require_finite_batch(inputs, used, "Calibration observes the ranges")
            call_model(model, inputs)
            used += 1
    if used == 0:
        raise ValueError("calibration got no batches")
    finish_calibration(model)
    return used


def start_calibration(model: nn.Module) -> list[FakeQuantizer]:
    """Forget what the quantizers of ``model`` observed, switch fake quantization off and observing on;
    returns them (they observe in training mode: :func:`calibrate` runs the model in eval mode around them)."""
    observed = quantizers(model)
    if not observed:
        raise ValueError(
            f"{type(model).__name__} has no quantized layer to calibrate: quantize it first (quantize_model)"
        )
    require_finite(dict(model.named_parameters()), "Post-training calibration observes what the parameters compute")
    for quantizer in observed:
        quantizer.observer.reset()
    set_quantization(model, enabled=False, observing=True)
    return observed


def finish_calibration(model: nn.Module) -> None:
    """Freeze the observed ranges of ``model``'s quantizers and switch fake quantization on."""
    set_quantization(model, enabled=True, observing=False)
