"""Fake quantization, ``x' = (clamp(round(x / scale) + zero_point) - zero_point) * scale``, with a straight-through gradient.

Built on torch's native operators (``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``
and their learnable variants for LSQ), not on the deprecated ``torch.ao.quantization``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_compress.quantization.observers import Observer
from lightning_compress.quantization.own_dtypes import KeepsDtypes


class FakeQuantizer(KeepsDtypes):
    """Observes a tensor's range and rounds the tensor onto the integer grid that range implies.

    The rounding is computed in float32 and the result cast back to the tensor's dtype (the gradient flows through
    both casts): in a bfloat16 model (Lightning's ``precision="bf16-true"``) the quantizer's state stays float32
    (:class:`KeepsDtypes`), so a tensor rounds to the integers a float32 model would give it, and the output is the
    bfloat16 nearest to each integer times its scale.

    Two switches, both buffers so checkpoints hold them: ``observing`` updates the range estimate (and
    with it ``scale`` and ``zero_point``) from each tensor seen in training mode (validation never moves
    the ranges; calibration puts the quantizers alone in training mode); ``enabled`` applies the rounding. With
    ``learnable=True`` the scale is a parameter learned by LSQ (Esser et al. 2020): the observer sets it
    once, at the first enabled call, and the gradient trains it from then on.

    With ``unsigned_when_non_negative=True`` (activations on a symmetric grid) the signed ``quant_range``
    gives way to the unsigned range of the same width, ``[0, 2^bits - 1]`` with zero point 0, while every
    value observed is non-negative (the output of a ReLU), as NNCF's symmetric quantizers decide their
    sign from statistics: the sign bit would hold nothing there, so the step halves, and the integer
    graph keeps such a tensor in uint8 from one layer to the next instead of requantizing it to int8.

    With ``group_size`` (weights, ``channel_axis=0``) each row of a 2-D tensor has one grid per group of that many
    consecutive columns: the tensor is observed and rounded as ``(rows * groups, group_size)``, so ``scale`` holds
    ``rows * groups`` values, row by row.

    Example:
        >>> import torch
        >>> quantizer = FakeQuantizer(Observer("minmax"), quant_range=(-127, 127), symmetric=True)
        >>> _ = quantizer(torch.tensor([-1.0, 1.0]))  # observes: scale = 1 / 127
        >>> quantizer.enabled.fill_(True)
        tensor(True)
        >>> quantizer(torch.tensor([0.0, 0.5, 1.0])) * 127
        tensor([  0.,  64., 127.])
        >>> after_relu = FakeQuantizer(Observer("minmax"), quant_range=(-128, 127), symmetric=True, unsigned_when_non_negative=True)
        >>> _ = after_relu(torch.tensor([0.0, 2.0]))
        >>> after_relu.quant_range, round(after_relu.scale.item() * 255, 4)
        ((0, 255), 2.0)
        >>> grouped = FakeQuantizer(Observer("minmax", channels=2), (-7, 7), True, channel_axis=0, group_size=2)
        >>> _ = grouped(torch.tensor([[7.0, 1.0, 14.0, 2.0]]))
        >>> grouped.scale.tolist()
        [1.0, 2.0]
    """

    def __init__(
        self,
        observer: Observer,
        quant_range: tuple[int, int],
        symmetric: bool,
        channel_axis: int | None = None,
        learnable: bool = False,
        unsigned_when_non_negative: bool = False,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        if group_size is not None and channel_axis != 0:
            raise ValueError(f"group_size={group_size} needs channel_axis=0 (the rows of a weight), got {channel_axis}")
        self.group_size = group_size
        self.observer = observer
        self.signed_range = quant_range
        self.symmetric = symmetric
        self.unsigned_when_non_negative = unsigned_when_non_negative
        self.channel_axis = channel_axis
        self.learnable = learnable
        shape = observer.min_val.shape
        scale = torch.ones(shape, dtype=torch.float32)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("enabled", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def quant_range(self) -> tuple[int, int]:
        """The integers the grid holds: ``quant_range`` as given, or unsigned from 0 (see the class)."""
        low, high = self.signed_range
        if self.unsigned_when_non_negative and low < 0 and bool((self.observer.min_val >= 0).all()):
            return 0, high - low
        return low, high

    @property
    def quant_min(self) -> int:
        return self.quant_range[0]

    @property
    def quant_max(self) -> int:
        return self.quant_range[1]

    @property
    def bits(self) -> int:
        return int(self.quant_max - self.quant_min).bit_length()

    @torch.no_grad()
    def _update_qparams(self) -> None:
        scale, zero_point = self.observer.qparams(*self.quant_range, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return self._fake_quantize(x)
        if x.dim() != 2 or x.shape[1] % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} groups the columns of a 2-D weight; got shape {tuple(x.shape)}"
            )
        return self._fake_quantize(x.reshape(-1, self.group_size)).reshape(x.shape)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        learned = self.learnable and bool(self.initialized) and bool(self.enabled)
        if self.training and bool(self.observing) and not learned:
            self.observer(x)
            self._update_qparams()
        if not bool(self.enabled):
            return x
        if not bool(self.initialized):
            raise RuntimeError(
                "fake quantization is enabled but the range was never observed; observe some inputs first"
            )
        return self._round(x.float()).to(x.dtype)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (float32) onto the grid."""
        if self.learnable:
            return self._learnable(x)
        quant_min, quant_max = self.quant_range
        if self.channel_axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, quant_min, quant_max)
        return torch.fake_quantize_per_channel_affine(
            x, self.scale, self.zero_point, self.channel_axis, quant_min, quant_max
        )

    def _learnable(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ: the step size's gradient scaled by 1 / sqrt(values per step size * quant_max)."""
        per_scale = (
            x.numel() // max(self.scale.numel(), 1)
            if self.channel_axis is not None
            else x[0].numel()
            if x.dim() > 1
            else x.numel()
        )
        quant_min, quant_max = self.quant_range
        grad_factor = 1.0 / math.sqrt(per_scale * quant_max)
        zero_point = self.zero_point.float()
        if self.channel_axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale.reshape(1), zero_point.reshape(1), quant_min, quant_max, grad_factor
            )
        return torch._fake_quantize_learnable_per_channel_affine(
            x, self.scale, zero_point, self.channel_axis, quant_min, quant_max, grad_factor
        )

    def extra_repr(self) -> str:
        granularity = "per tensor" if self.channel_axis is None else f"per channel (axis {self.channel_axis})"
        if self.group_size is not None:
            granularity = f"per channel and group of {self.group_size} columns"
        low, high = self.quant_range
        return f"range=[{low}, {high}], {granularity}, observer={self.observer.kind}, learnable={self.learnable}"
