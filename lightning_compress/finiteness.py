"""Whether tensors are finite: the count of NaN and infinite elements, and the check that a method which ranks,
clusters or calibrates weights runs before it does, so that NaN never turns silently into a mask or a codebook."""

from __future__ import annotations

from collections.abc import Mapping

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
