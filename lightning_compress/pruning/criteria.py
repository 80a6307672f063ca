"""Importance scores of weights (higher survives): magnitude, channel norms, first-order Taylor, random."""

from __future__ import annotations

import torch

CRITERIA = ("magnitude", "l1", "l2", "taylor", "random")


def element_scores(
    weight: torch.Tensor, criterion: str, taylor: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One score per weight: ``|w|``, accumulated ``|w * dL/dw|`` (``taylor``), or uniform noise (``random``).

    Example:
        >>> import torch
        >>> element_scores(torch.tensor([-3.0, 1.0, 0.5]), "magnitude").tolist()
        [3.0, 1.0, 0.5]
    """
    if criterion in ("magnitude", "l1", "l2"):
        return weight.detach().abs()
    if criterion == "taylor":
        if taylor is None:
            raise ValueError("the taylor criterion needs accumulated |w * grad| scores; none were collected")
        return taylor
    if criterion == "random":
        return torch.rand(weight.shape, generator=generator).to(weight.device)
    raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")


def channel_scores(
    weight: torch.Tensor, criterion: str, taylor: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One score per output channel (dimension 0): L1 norm (``magnitude`` and ``l1``), L2 norm, summed Taylor, random.

    Example:
        >>> import torch
        >>> channel_scores(torch.tensor([[3.0, -4.0], [1.0, 0.0]]), "l2").tolist()
        [5.0, 1.0]
    """
    rows = weight.detach().flatten(1)
    if criterion in ("magnitude", "l1"):
        return rows.abs().sum(dim=1)
    if criterion == "l2":
        return rows.norm(p=2, dim=1)
    return element_scores(weight, criterion, taylor, generator).flatten(1).sum(dim=1)


def taylor_scores(weight: torch.Tensor) -> torch.Tensor:
    """First-order Taylor importance of one backward pass, ``|w * dL/dw|`` (Molchanov et al.), per weight."""
    if weight.grad is None:
        raise ValueError("taylor_scores needs the weight's gradient; call it after backward()")
    return (weight.detach() * weight.grad.detach()).abs()
