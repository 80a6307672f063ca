"""Quantizer settings: bit widths, symmetry, granularity, observer, and the integer ranges they imply."""

from __future__ import annotations

from dataclasses import dataclass

#: The x86 CPUs an integer export can be made for (``QuantConfig.target_cpu``): see :class:`QuantConfig`
TARGET_CPUS = ("avx2", "vnni")
OBSERVERS = ("minmax", "moving_average", "mean_std", "percentile")
BITS = range(2, 9)
BIAS_BITS = range(8, 33)


@dataclass(frozen=True)
class QuantConfig:
    """How weights and activations are quantized; checked when made, so bad settings fail before training.

    Weights use the restricted symmetric range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (zero point 0) or the
    unsigned range ``[0, 2^b - 1]`` with a zero point when ``symmetric=False``; activations use the full
    signed range ``[-2^(b-1), 2^(b-1) - 1]`` (``activation_range``) or the unsigned one with a zero point;
    ``activation_symmetric`` sets that apart from the weights' (``None``: as ``symmetric``), e.g. symmetric
    int8 weights with asymmetric uint8 activations, ONNX Runtime's own pairing for transformers, whose
    LayerNorm and GELU outputs are far from symmetric. A symmetric
    activation quantizer whose observed inputs are all non-negative (behind a ReLU) turns to the unsigned
    range with zero point 0 (see :class:`FakeQuantizer`). Either way zero is exactly representable,
    so pruned weights stay exactly zero. Biases are rounded onto the accumulator's grid, step
    ``input scale * weight scale``, in a signed ``bias_bits`` range (32 by default, as int8 runtimes
    accumulate), like Intel Distiller's ``bits_accum``. ``reduce_range=True`` keeps weights one bit short of
    ``weight_bits`` (``[-63, 63]`` at 8 bits), as ONNX Runtime's ``quantize_static(reduce_range=True)``.
    ``target_cpu`` names the x86 CPUs the ONNX export is for, whose int8 kernels differ (:data:`TARGET_CPUS`):
    ``"avx2"`` (the default: every x86 CPU with AVX2, with or without VNNI) multiplies uint8 inputs by int8
    weights into saturating 16-bit sums of two products, which weights up to 64 in magnitude never overflow;
    ``"vnni"`` (CPUs with the ``avx512_vnni`` or ``avx_vnni`` flag) sums them in 32 bits. ``reduce_range=None``
    (the default) chooses for the target: 7-bit weights where ``weight_bits`` is 8 and ``target_cpu="avx2"``
    (symmetric, without ``group_size``), which run exactly in the fast uint8 x int8 kernels of every x86
    CPU; full 8-bit weights for ``"vnni"``, stored as int8, exact and as fast on VNNI CPUs but not exact on
    CPUs without VNNI. ``reduce_range=False`` with ``target_cpu="avx2"`` keeps full 8-bit weights stored as
    uint8 (128 higher, the same grid): exact on every CPU, in uint8 x uint8 kernels that were 1.4x-1.8x as
    slow as int8 weights' on an AVX-512 VNNI CPU (SmallCNN) and 1.1x-1.15x on an AVX2 one (MiniLM).
    ``group_size`` gives each output channel of a linear layer one scale per group of that many consecutive
    input columns (GPTQ's and AWQ's ``group_size=128``): weight-only quantization, whose inputs and bias stay
    in float, exported as ONNX's block-wise ``DequantizeLinear`` before the ``MatMul``, which ONNX Runtime
    runs as its ``MatMulNBits``.

    Example:
        >>> config = QuantConfig(weight_bits=4, activation_bits=8)
        >>> config.weight_range, config.activation_range
        ((-7, 7), (-128, 127))
        >>> QuantConfig(symmetric=False).activation_range
        (0, 255)
        >>> QuantConfig(activation_symmetric=False).activation_range
        (0, 255)
        >>> QuantConfig().weight_range, QuantConfig(reduce_range=False).weight_range
        ((-63, 63), (-127, 127))
        >>> QuantConfig(target_cpu="vnni").weight_range, QuantConfig(weight_bits=4).weight_range
        ((-127, 127), (-7, 7))
        >>> QuantConfig(weight_bits=4, group_size=128).group_size
        128
    """

    weight_bits: int = 8
    activation_bits: int = 8
    bias_bits: int = 32
    per_channel: bool = True
    group_size: int | None = None
    symmetric: bool = True
    activation_symmetric: bool | None = None
    reduce_range: bool | None = None
    target_cpu: str = "avx2"
    observer: str = "moving_average"
    learnable_scales: bool = False
    averaging_constant: float | None = 0.01
    n_std: float = 3.0
    percentile: float = 99.99

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or bits not in BITS:
                raise ValueError(
                    f"{name} must be an integer from {BITS.start} to {BITS.stop - 1}, got {bits!r} "
                    "(for 16-bit floating point use lightning_compress.half_precision)"
                )
        if not isinstance(self.bias_bits, int) or self.bias_bits not in BIAS_BITS:
            raise ValueError(
                f"bias_bits must be an integer from {BIAS_BITS.start} to {BIAS_BITS.stop - 1}, got {self.bias_bits!r}"
            )
        if self.group_size is not None and (
            not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1
        ):
            raise ValueError(f"group_size must be None or an integer >= 1, got {self.group_size!r}")
        if self.group_size is not None and not self.per_channel:
            raise ValueError(
                f"group_size={self.group_size} needs per_channel=True: its scales are per output channel and group"
            )
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise ValueError(
                f"reduce_range must be True, False or None (chosen for target_cpu), got {self.reduce_range!r}"
            )
        if self.target_cpu not in TARGET_CPUS:
            raise ValueError(
                f"target_cpu must be one of {', '.join(TARGET_CPUS)} (avx2: every x86 CPU with AVX2; vnni: those with "
                f"the avx512_vnni or avx_vnni flag), got {self.target_cpu!r}"
            )
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; use one of {', '.join(OBSERVERS)}")
        if self.averaging_constant is not None and not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(
                f"averaging_constant must be in (0, 1] or None (the plain mean over batches), got {self.averaging_constant}"
            )
        if self.n_std <= 0:
            raise ValueError(f"n_std must be positive, got {self.n_std}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")

    @property
    def reduces_range(self) -> bool:
        """Whether weights keep one bit short of ``weight_bits``: ``reduce_range``, or where it is ``None``, whether
        8-bit symmetric weights (without ``group_size``) are for ``target_cpu="avx2"``."""
        if self.reduce_range is not None:
            return self.reduce_range
        return self.weight_bits == 8 and self.symmetric and self.group_size is None and self.target_cpu == "avx2"

    @property
    def weight_range(self) -> tuple[int, int]:
        bits = self.weight_bits - 1 if self.reduces_range else self.weight_bits
        if self.symmetric:
            return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1

    @property
    def activations_symmetric(self) -> bool:
        """Whether activations are quantized symmetrically: ``activation_symmetric``, or ``symmetric`` without it."""
        return self.symmetric if self.activation_symmetric is None else self.activation_symmetric

    @property
    def activation_range(self) -> tuple[int, int]:
        if self.activations_symmetric:
            return -(2 ** (self.activation_bits - 1)), 2 ** (self.activation_bits - 1) - 1
        return 0, 2**self.activation_bits - 1

    @property
    def bias_range(self) -> tuple[int, int]:
        return -(2 ** (self.bias_bits - 1)), 2 ** (self.bias_bits - 1) - 1
