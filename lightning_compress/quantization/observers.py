"""Observers: running estimates of a tensor's range, turned into a quantizer's scale and zero point.

Weights are observed by the min-max of their latest values (``"latest"``, per output channel or per tensor).
Activation ranges can be clipped the ways Intel Distiller's post-training quantizer offered: none
(min-max over everything seen), a running average of each batch's min and max (exponential with
``averaging_constant``, or the plain mean over batches with ``None``, Distiller's "AVG"), mean ± n
standard deviations, or a percentile of each batch's values (averaged like the running average).
"""

from __future__ import annotations

import torch

from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.own_dtypes import KeepsDtypes

_EPS = torch.finfo(torch.float32).eps


class Observer(KeepsDtypes):
    """Tracks ``min_val`` / ``max_val`` (buffers, so checkpoints hold them) per channel or per tensor, in float32
    whatever the model's precision (:class:`KeepsDtypes`).

    Example:
        >>> import torch
        >>> observer = Observer("minmax")
        >>> observer(torch.tensor([-1.0, 0.5])); observer(torch.tensor([2.0]))
        >>> observer.min_val.item(), observer.max_val.item()
        (-1.0, 2.0)
        >>> scale, zero_point = observer.qparams(-127, 127, symmetric=True)
        >>> round(scale.item() * 127, 6), zero_point.item()
        (2.0, 0)
    """

    def __init__(
        self,
        kind: str = "minmax",
        channels: int | None = None,
        channel_axis: int = 0,
        averaging_constant: float | None = 0.01,
        n_std: float = 3.0,
        percentile: float = 99.99,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.channel_axis = channel_axis
        self.averaging_constant = averaging_constant
        self.n_std = n_std
        self.percentile = percentile
        shape = (channels,) if channels is not None else ()
        self.register_buffer("min_val", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("max_val", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        if kind == "mean_std":  # running sums over every value seen
            self.register_buffer("count", torch.zeros(shape, dtype=torch.float64))
            self.register_buffer("total", torch.zeros(shape, dtype=torch.float64))
            self.register_buffer("total_sq", torch.zeros(shape, dtype=torch.float64))
            self.register_buffer("min_seen", torch.zeros(shape, dtype=torch.float32))
            self.register_buffer("max_seen", torch.zeros(shape, dtype=torch.float32))

    @classmethod
    def for_activations(cls, config: QuantConfig) -> Observer:
        return cls(
            config.observer,
            averaging_constant=config.averaging_constant,
            n_std=config.n_std,
            percentile=config.percentile,
        )

    def _per_channel(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (values,) per tensor or (channels, values) per channel."""
        if self.min_val.dim() == 0:
            return x.reshape(-1)
        return x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        values = self._per_channel(x.detach().float())
        first = int(self.batches) == 0
        if self.kind == "mean_std":
            self.count += values.shape[-1]
            self.total += values.sum(-1, dtype=torch.float64)
            self.total_sq += (values.double() ** 2).sum(-1)
            mean = self.total / self.count
            std = (self.total_sq / self.count - mean**2).clamp_min(0).sqrt()
            self.min_seen.copy_(values.amin(-1) if first else torch.minimum(self.min_seen, values.amin(-1)))
            self.max_seen.copy_(values.amax(-1) if first else torch.maximum(self.max_seen, values.amax(-1)))
            # never wider than what was actually seen
            low = torch.maximum((mean - self.n_std * std).float(), self.min_seen)
            high = torch.minimum((mean + self.n_std * std).float(), self.max_seen)
        elif self.kind == "percentile":
            bounds = [1.0 - self.percentile / 100.0, self.percentile / 100.0]
            quantiles = torch.tensor(bounds, dtype=values.dtype, device=values.device)
            low, high = _quantiles(values, quantiles)
        else:
            low, high = values.amin(-1), values.amax(-1)
        if self.kind == "minmax" and not first:  # "latest" keeps only this tensor's range
            low, high = torch.minimum(self.min_val, low), torch.maximum(self.max_val, high)
        elif self.kind in ("moving_average", "percentile") and not first:
            weight = self.averaging_constant if self.averaging_constant is not None else 1.0 / (int(self.batches) + 1)
            low = self.min_val + weight * (low - self.min_val)
            high = self.max_val + weight * (high - self.max_val)
        self.min_val.copy_(low)
        self.max_val.copy_(high)
        self.batches += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Forget everything observed: the next tensor starts a new estimate."""
        self.batches.zero_()
        if self.kind == "mean_std":
            for name in ("count", "total", "total_sq"):
                getattr(self, name).zero_()

    def qparams(self, quant_min: int, quant_max: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (int32) that map the observed range onto ``[quant_min, quant_max]``."""
        low, high = self.min_val.clamp_max(0), self.max_val.clamp_min(0)  # zero must be representable
        if symmetric:
            scale = (torch.maximum(-low, high) / quant_max).clamp_min(_EPS)
            return scale, torch.zeros_like(scale, dtype=torch.int32)
        scale = ((high - low) / (quant_max - quant_min)).clamp_min(_EPS)
        zero_point = (quant_min - torch.round(low / scale)).clamp(quant_min, quant_max).to(torch.int32)
        return scale, zero_point


def _quantiles(values: torch.Tensor, quantiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper quantile along the last dimension (sampled down to 2^24 values, torch.quantile's limit)."""
    if values.shape[-1] > 2**24:
        values = values[..., torch.randperm(values.shape[-1], device=values.device)[: 2**24]]
    low, high = torch.quantile(values, quantiles, dim=-1)
    return low, high
