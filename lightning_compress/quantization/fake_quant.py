"""Fake quantization, ``x' = (clamp(round(x / scale) + zero_point) - zero_point) * scale``, with a straight-through gradient.

Built on torch's native operators (``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``
and their learnable variants for LSQ), not on the deprecated ``torch.ao.quantization``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_compress.quantization.observers import Observer


class FakeQuantizer(nn.Module):
    """Observes a tensor's range and rounds the tensor onto the integer grid that range implies.

    Two switches, both buffers so checkpoints hold them: ``observing`` updates the range estimate (and
    with it ``scale`` and ``zero_point``) from each tensor seen in training mode (validation never moves
    the ranges; calibration puts the quantizers alone in training mode); ``enabled`` applies the rounding. With
    ``learnable=True`` the scale is a parameter learned by LSQ (Esser et al. 2020): the observer sets it
    once, at the first enabled call, and the gradient trains it from then on.

    Example:
        >>> import torch
        >>> quantizer = FakeQuantizer(Observer("minmax"), quant_range=(-127, 127), symmetric=True)
        >>> _ = quantizer(torch.tensor([-1.0, 1.0]))  # observes: scale = 1 / 127
        >>> quantizer.enabled.fill_(True)
        tensor(True)
        >>> quantizer(torch.tensor([0.0, 0.5, 1.0])) * 127
        tensor([  0.,  64., 127.])
    """

    def __init__(
        self,
        observer: Observer,
        quant_range: tuple[int, int],
        symmetric: bool,
        channel_axis: int | None = None,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.observer = observer
        self.quant_min, self.quant_max = quant_range
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        self.learnable = learnable
        shape = observer.min_val.shape
        scale = torch.ones(shape)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("enabled", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def bits(self) -> int:
        return int(self.quant_max - self.quant_min).bit_length()

    @torch.no_grad()
    def _update_qparams(self) -> None:
        scale, zero_point = self.observer.qparams(self.quant_min, self.quant_max, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learned = self.learnable and bool(self.initialized) and bool(self.enabled)
        if self.training and bool(self.observing) and not learned:
            self.observer(x)
            self._update_qparams()
        if not bool(self.enabled):
            return x
        if not bool(self.initialized):
            raise RuntimeError("fake quantization is enabled but the range was never observed; observe some inputs first")
        if self.learnable:
            return self._learnable(x)
        if self.channel_axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.channel_axis, self.quant_min, self.quant_max)

    def _learnable(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ: the step size's gradient scaled by 1 / sqrt(values per step size * quant_max)."""
        per_scale = x.numel() // max(self.scale.numel(), 1) if self.channel_axis is not None else x[0].numel() if x.dim() > 1 else x.numel()
        grad_factor = 1.0 / math.sqrt(per_scale * self.quant_max)
        zero_point = self.zero_point.float()
        if self.channel_axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale.reshape(1), zero_point.reshape(1), self.quant_min, self.quant_max, grad_factor
            )
        return torch._fake_quantize_learnable_per_channel_affine(
            x, self.scale, zero_point, self.channel_axis, self.quant_min, self.quant_max, grad_factor
        )

    def extra_repr(self) -> str:
        granularity = "per tensor" if self.channel_axis is None else f"per channel (axis {self.channel_axis})"
        return f"range=[{self.quant_min}, {self.quant_max}], {granularity}, observer={self.observer.kind}, learnable={self.learnable}"
