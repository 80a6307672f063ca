"""Whether tensors are finite: the count of NaN and infinite elements, and the check that a method which ranks,
clusters or calibrates weights runs before it does, so that NaN never turns silently into a mask or a codebook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def non_finite_counts(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """How many elements of each tensor are NaN or infinite, for the tensors that have any (one sync for all).

    Example:
        >>> non_finite_counts({"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)})
        {'a': 1}
    """
    if not tensors:
        return {}
    counts = torch.stack([(~torch.isfinite(tensor.detach())).sum() for tensor in tensors.values()]).tolist()
    return {name: count for name, count in zip(tensors, counts, strict=True) if count}


def require_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the tensors that hold NaN or infinity (at most five, with their counts).

    ``what`` says who needs them finite, e.g. ``"Pruning ranks the weights"``.

    Example:
        >>> require_finite({"fc.weight": torch.tensor([float("inf"), 1.0])}, "Pruning ranks the weights")
        Traceback (most recent call last):
        ...
        ValueError: Pruning ranks the weights, so they must be finite, but 1 element of 'fc.weight' is NaN or infinite: training diverged or the model was loaded broken (the FiniteCheck callback stops a fit where it happens)
    """
    broken = non_finite_counts(tensors)
    if not broken:
        return
    parts = [f"{count} element{'s' if count > 1 else ''} of {name!r}" for name, count in list(broken.items())[:5]]
    more = f" and {len(broken) - 5} more tensors" if len(broken) > 5 else ""
    verb = "is" if len(broken) == 1 and sum(broken.values()) == 1 else "are"
    raise ValueError(
        f"{what}, so they must be finite, but {', '.join(parts)}{more} {verb} NaN or infinite: training diverged or "
        "the model was loaded broken (the FiniteCheck callback stops a fit where it happens)"
    )


def require_finite_batch(inputs: Any, index: int, what: str) -> None:
    """Raise ``ValueError`` naming calibration batch ``index`` when a floating tensor of its ``inputs`` (a tensor, a
    tuple of them, or tensors by keyword) holds NaN or infinity; ``what`` says who reads it.

    Example:
        >>> require_finite_batch({"x": torch.tensor([1.0, float("nan")])}, 3, "Calibration observes the ranges")
        Traceback (most recent call last):
        ...
        ValueError: Calibration observes the ranges of its batches, but calibration batch 3 holds 1 NaN or infinite input value: every range and layer it reaches would be NaN; drop or clean that batch
    """
    tensors = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, tuple) else [inputs]
    floating = {str(i): t for i, t in enumerate(tensors) if isinstance(t, torch.Tensor) and t.is_floating_point()}
    count = sum(non_finite_counts(floating).values())
    if count:
        raise ValueError(
            f"{what} of its batches, but calibration batch {index} holds {count} NaN or infinite input "
            f"value{'s' if count > 1 else ''}: every range and layer it reaches would be NaN; drop or clean that batch"
        )
