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


def normalize_per_layer(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's scores divided by their mean, so that one ranking of channels or heads across layers compares
    each with its own layer's (Torch-Pruning's ``"mean"`` normalizer). A layer's order is unchanged.

    Example:
        >>> import torch
        >>> normalized = normalize_per_layer({"small": torch.tensor([0.25, 0.75]), "large": torch.tensor([1.0, 3.0])})
        >>> normalized["small"].tolist() == normalized["large"].tolist() == [0.5, 1.5]
        True
    """
    return {name: score / score.mean().clamp_min(1e-12) for name, score in scores.items()}


def lamp_scores(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAMP scores (Lee et al. 2021, layer-adaptive magnitude pruning): each score squared, over the sum of the
    squares of the scores in its layer that are at least as large.

    They rank weights of layers of different scales together: a layer scaled by any factor keeps its scores,
    the largest of every layer scores 1, and a layer's order is unchanged (ties are broken by position). A
    layer of all-zero scores scores 0. Ranked globally, small layers keep a larger share than large ones.

    Example:
        >>> import torch
        >>> lamp = lamp_scores({"a": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([100.0, 200.0, 200.0])})
        >>> lamp["a"].tolist() == lamp["b"].tolist(), [round(value, 4) for value in lamp["a"].tolist()]
        (True, [0.1111, 0.5, 1.0])
    """
    lamp = {}
    for name, score in scores.items():
        magnitudes, order = score.detach().flatten().abs().sort(stable=True)
        ascending = magnitudes.double().square()
        at_least = ascending.flip(0).cumsum(0).flip(0).clamp_min(torch.finfo(torch.float64).tiny)
        ranked = torch.empty(ascending.shape, dtype=torch.float32, device=score.device)
        ranked[order] = (ascending / at_least).float()
        lamp[name] = ranked.view(score.shape)
    return lamp
