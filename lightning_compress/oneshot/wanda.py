"""Wanda (Sun et al., 2024): a weight's importance is its magnitude times the norm of the input feature it
multiplies, compared within each output row."""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ||X_j||_2``: the weight ``(out, in)`` scaled by the norm of each input feature over the calibration rows.

    Example:
        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([100.0, 1.0])).tolist()
        [[100.0, 2.0]]
    """
    return weight.detach().abs().float() * feature_norms.to(weight.device).float().unsqueeze(0)


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of each output row, ``round(sparsity · weights)`` in all (``True`` where a weight
    survives): every row loses ``⌊count / rows⌋`` and the first ``count mod rows`` rows one more.

    Example:
        >>> row_masks(torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]), 0.5).tolist()
        [[True, False, True, False], [False, False, True, True]]
        >>> row_masks(torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]), 0.375).tolist()
        [[True, False, True, False], [False, True, True, True]]
    """
    rows, columns = scores.shape
    count = round(sparsity * scores.numel())
    per_row = torch.full((rows, 1), count // rows, device=scores.device)
    per_row[: count % rows] += 1
    lowest_first = scores.argsort(dim=1, stable=True)
    pruned_in_order = torch.arange(columns, device=scores.device).unsqueeze(0) < per_row
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, lowest_first, ~pruned_in_order)
