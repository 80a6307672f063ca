"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer's weights column by column and update the
weights still free so the layer's outputs on its calibration inputs change as little as possible."""

from __future__ import annotations

import torch

from lightning_compress.oneshot.hessian import BLOCK_SIZE, optimal_brain_surgeon


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    factor: torch.Tensor,
    sparsity: float,
    n_of_m: tuple[int, int] | None = None,
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned and updated weight ``(out, in)``, and its mask (``True`` where a weight survives).

    ``factor`` is the upper Cholesky factor of the damped inverse Hessian of the layer's inputs
    (:func:`~lightning_compress.oneshot.hessian.inverse_hessian_factor`). Columns are visited left to right;
    pruning weight ``w`` of column ``i`` costs ``w² / U[i, i]²`` and moves the columns right of it by the
    optimal brain surgeon update. Unstructured masks are chosen per block of ``block_size`` columns (the
    lowest costs of the block, over all rows: the mask adapts as the weights move), so that exactly
    ``round(sparsity · weights)`` are pruned overall; with ``n_of_m=(n, m)`` the ``m - n`` cheapest of each
    row's group of ``m`` consecutive columns go, decided when the group is reached.

    Example:
        >>> from lightning_compress.oneshot.hessian import inverse_hessian_factor
        >>> inputs = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
        >>> weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        >>> factor = inverse_hessian_factor(inputs.T @ inputs / 256, 0.01, "fc")
        >>> pruned, mask = sparsegpt_prune(weight, factor, 0.5)
        >>> int(mask.sum()), bool((pruned[~mask] == 0).all())
        (16, True)
        >>> _, mask = sparsegpt_prune(weight, factor, 0.5, n_of_m=(2, 4))
        >>> mask.view(4, 2, 4).sum(-1).tolist()
        [[2, 2], [2, 2], [2, 2], [2, 2]]
    """
    rows = weight.shape[0]
    keep = torch.ones_like(weight, dtype=torch.bool)
    if n_of_m is not None:
        block_size -= block_size % n_of_m[1]  # a group never straddles two blocks
    pruned_so_far = 0

    def prune(block: torch.Tensor, start: int, column: int) -> torch.Tensor:
        nonlocal pruned_so_far
        end = start + block.shape[1]
        if n_of_m is None and column == 0:  # the block's mask, from its weights as they stand now
            count = round(sparsity * rows * end) - pruned_so_far
            costs = block.square() / factor[start:end, start:end].diagonal().square()
            block_keep = torch.ones_like(block, dtype=torch.bool)
            block_keep.view(-1)[torch.topk(costs.flatten(), count, largest=False).indices] = False
            keep[:, start:end] = block_keep
            pruned_so_far += count
        elif n_of_m is not None and column % n_of_m[1] == 0:  # the group's mask, as it is reached
            n, m = n_of_m
            group = slice(start + column, start + column + m)
            costs = block[:, column : column + m].square() / factor[group, group].diagonal().square()
            keep[:, group].scatter_(1, torch.topk(costs, m - n, dim=1, largest=False).indices, False)
        values = block[:, column]
        return torch.where(keep[:, start + column], values, torch.zeros_like(values))

    return optimal_brain_surgeon(weight, factor, prune, block_size).to(weight.dtype), keep
