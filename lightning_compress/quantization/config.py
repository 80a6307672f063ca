"""Quantizer settings: bit widths, symmetry, granularity, observer, and the integer ranges they imply."""

from __future__ import annotations

from dataclasses import dataclass

OBSERVERS = ("minmax", "moving_average", "mean_std", "percentile")
BITS = range(2, 9)


@dataclass(frozen=True)
class QuantConfig:
    """How weights and activations are quantized; checked when made, so bad settings fail before training.

    Weights use the restricted symmetric range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (zero point 0) or the
    unsigned range ``[0, 2^b - 1]`` with a zero point when ``symmetric=False``; activations use the full
    signed range ``[-2^(b-1), 2^(b-1) - 1]`` or the unsigned one. Either way zero is exactly representable,
    so pruned weights stay exactly zero.

    Example:
        >>> config = QuantConfig(weight_bits=4, activation_bits=8)
        >>> config.weight_range, config.activation_range
        ((-7, 7), (-128, 127))
        >>> QuantConfig(symmetric=False).activation_range
        (0, 255)
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    symmetric: bool = True
    observer: str = "moving_average"
    learnable_scales: bool = False
    averaging_constant: float = 0.01
    n_std: float = 3.0
    percentile: float = 99.99

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or bits not in BITS:
                raise ValueError(f"{name} must be an integer from {BITS.start} to {BITS.stop - 1}, got {bits!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; use one of {', '.join(OBSERVERS)}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {self.averaging_constant}")
        if self.n_std <= 0:
            raise ValueError(f"n_std must be positive, got {self.n_std}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def weight_range(self) -> tuple[int, int]:
        if self.symmetric:
            return -(2 ** (self.weight_bits - 1) - 1), 2 ** (self.weight_bits - 1) - 1
        return 0, 2**self.weight_bits - 1

    @property
    def activation_range(self) -> tuple[int, int]:
        if self.symmetric:
            return -(2 ** (self.activation_bits - 1)), 2 ** (self.activation_bits - 1) - 1
        return 0, 2**self.activation_bits - 1
