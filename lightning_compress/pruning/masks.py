"""Masks from importance scores: exact counts, global or per layer, N:M groups, the threshold rule.

A mask is a boolean tensor, ``True`` where the weight survives. Scores of entries that an earlier mask
already pruned should be ``-inf`` (see :func:`forget_pruned`) so that masks only ever grow sparser.
"""

from __future__ import annotations

import torch

SCOPES = ("global", "layer")


def forget_pruned(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores with the entries pruned by ``masks`` set to ``-inf``, so that no later step revives them."""
    return {
        name: score.masked_fill(~masks[name], float("-inf")) if name in masks else score
        for name, score in scores.items()
    }


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        keep[torch.topk(scores.flatten().float(), count, largest=False).indices] = False
    return keep.view(scores.shape)


def rank_masks(
    scores: dict[str, torch.Tensor], sparsity: float | dict[str, float], scope: str = "global", min_keep: int = 0
) -> dict[str, torch.Tensor]:
    """Prune exactly ``round(sparsity * n)`` lowest-scoring entries, over all layers or in each layer.

    ``scope="global"`` ranks all entries of all layers together (``n`` is their total);
    ``scope="layer"`` prunes each layer to ``sparsity`` on its own, or to its own entry of a
    ``sparsity`` dict (0 for a layer it does not name). ``min_keep`` entries of each layer always
    survive (one channel per layer keeps a network connected).

    Example:
        >>> import torch
        >>> masks = rank_masks({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([False, True], [False, True])
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    if scope == "layer":
        targets = sparsity if isinstance(sparsity, dict) else dict.fromkeys(scores, sparsity)
        return {
            name: _prune_lowest(score, min(round(targets.get(name, 0.0) * score.numel()), score.numel() - min_keep))
            for name, score in scores.items()
        }
    if isinstance(sparsity, dict):
        raise ValueError("a sparsity per layer needs scope='layer'")
    protected = {name: _protect_top(score, min_keep) for name, score in scores.items()}
    flat = torch.cat([score.flatten().float() for score in protected.values()])
    keep = _prune_lowest(flat, min(round(sparsity * flat.numel()), flat.numel() - min_keep * len(scores)))
    sizes = [score.numel() for score in scores.values()]
    return {name: part.view(score.shape) for (name, score), part in zip(scores.items(), keep.split(sizes), strict=True)}


def _protect_top(score: torch.Tensor, count: int) -> torch.Tensor:
    """``score`` with its ``count`` highest entries raised to ``+inf`` so a global ranking never prunes them."""
    if count == 0:
        return score
    protected = score.flatten().clone().float()
    protected[torch.topk(protected, count).indices] = float("inf")
    return protected.view(score.shape)


def threshold_masks(weights: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """The rule ``|w| > threshold``: weights at or below the threshold in magnitude are pruned."""
    return {name: weight.abs() > threshold for name, weight in weights.items()}


def n_of_m_masks(scores: dict[str, torch.Tensor], n: int, m: int) -> dict[str, torch.Tensor]:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive weights along the input dimension.

    The input dimension is dimension 1 of a ``Linear`` or ``Conv`` weight; for a convolution the groups
    run along input channels at each kernel position, the layout sparse tensor cores expect.

    Example:
        >>> import torch
        >>> n_of_m_masks({"w": torch.tensor([[4.0, 1.0, 3.0, 2.0]])}, 2, 4)["w"].tolist()
        [[True, False, True, False]]
    """
    masks = {}
    for name, score in scores.items():
        if score.dim() < 2 or score.shape[1] % m:
            raise ValueError(
                f"{n}:{m} sparsity needs the input dimension of {name!r} divisible by {m}, but its weight is {tuple(score.shape)}"
            )
        channels_last = score.movedim(1, -1)
        groups = channels_last.reshape(-1, m).float()
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
        masks[name] = keep.view(channels_last.shape).movedim(-1, 1).contiguous()
    return masks
