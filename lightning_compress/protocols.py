"""The contracts between a model and the compression methods, as ``typing.Protocol``s a class meets by having the members.

A model (or a layer) does not subclass these: having the attribute or the method is enough, and the
methods check with ``isinstance`` (the protocols are runtime-checkable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ExcludesFromCompression(Protocol):
    """A model with layers that exist only for training, which no compression method may select.

    ``compression_exclude`` holds shell-style patterns on module names, e.g. ``("adapters.*",)`` for
    the feature adapters of :class:`~lightning_compress.DistillationModule`;
    :func:`~lightning_compress.targets.select_layers` leaves the matching layers out.

    Example:
        >>> from torch import nn
        >>> class WithHead(nn.Module):
        ...     compression_exclude = ("probe",)
        >>> isinstance(WithHead(), ExcludesFromCompression), isinstance(nn.Linear(2, 2), ExcludesFromCompression)
        (True, False)
    """

    compression_exclude: Sequence[str]


@runtime_checkable
class HasOutputChannelState(Protocol):
    """A layer that keeps tensors indexed by its output channel besides its weight and bias.

    ``output_channel_state()`` returns them by name relative to the layer (a quantized layer's weight
    scales, zero points and observed ranges); channel removal cuts them along with the weight's rows,
    so the smaller layer computes what the masked one did.

    Example:
        >>> import torch
        >>> from lightning_compress.quantization import QuantConfig, quantize_model
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> _ = quantize_model(model, QuantConfig())
        >>> isinstance(model[0], HasOutputChannelState), sorted(model[0].output_channel_state())[:2]
        (True, ['weight_quantizer.observer.max_val', 'weight_quantizer.observer.min_val'])
    """

    def output_channel_state(self) -> dict[str, torch.Tensor]: ...
