"""Masks from importance scores: exact counts, global or per layer (every output unit keeps its best entry), N:M
groups, the threshold rule.

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
    scores: dict[str, torch.Tensor], sparsity: float | dict[str, float], scope: str = "global", keep_rows: bool = True
) -> dict[str, torch.Tensor]:
    """Prune exactly ``round(sparsity * n)`` lowest-scoring entries, over all layers or in each layer.

    ``scope="global"`` ranks all entries of all layers together (``n`` is their total);
    ``scope="layer"`` prunes each layer to ``sparsity`` on its own, or to its own entry of a
    ``sparsity`` dict (0 for a layer it does not name). With ``keep_rows`` (the default) the highest
    score of every row (output unit: a slice along dimension 0; a 1-D tensor, such as one score per
    channel, is one row) always survives, so no output unit and no layer is ever emptied; a sparsity
    that cannot leave them raises ``ValueError`` (see :func:`check_row_floor`).

    Example:
        >>> import torch
        >>> masks = rank_masks({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([False, True], [False, True])
        >>> rank_masks({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, 0.5)["w"].tolist()  # each row keeps one
        [[False, True], [False, True]]
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    if scope == "global" and isinstance(sparsity, dict):
        raise ValueError("a sparsity per layer needs scope='layer'")
    if keep_rows:
        check_row_floor({name: score.shape for name, score in scores.items()}, sparsity, scope)
        scores = {name: _protect_row_tops(score) for name, score in scores.items()}
    if scope == "layer":
        targets = sparsity if isinstance(sparsity, dict) else dict.fromkeys(scores, sparsity)
        return {
            name: _prune_lowest(score, round(targets.get(name, 0.0) * score.numel())) for name, score in scores.items()
        }
    flat = torch.cat([score.flatten().float() for score in scores.values()])
    keep = _prune_lowest(flat, round(sparsity * flat.numel()))
    sizes = [score.numel() for score in scores.values()]
    return {name: part.view(score.shape) for (name, score), part in zip(scores.items(), keep.split(sizes), strict=True)}


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a matrix of its output units: one row per slice along dimension 0 (a 1-D tensor is one row)."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)


def check_row_floor(shapes: dict[str, torch.Size], sparsity: float | dict[str, float], scope: str = "global") -> None:
    """Raise ``ValueError`` unless pruning exactly ``round(sparsity * n)`` entries leaves one in every row.

    A row is an output unit of a weight (a slice along dimension 0); a 1-D shape (one score per channel or
    head of a layer) is one row. With ``scope="global"`` the count is over all ``shapes`` together, with
    ``"layer"`` over each on its own.

    Example:
        >>> check_row_floor({"depthwise": torch.Size([32, 1, 3, 3])}, 0.9, "layer")
        Traceback (most recent call last):
        ...
        ValueError: sparsity per layer cannot be met: pruning never empties an output unit (a row of a weight) or a layer (its last channel or head); 'depthwise' at 0.9 (32 rows of 9) can be pruned to at most 0.8889
    """
    rows = {name: (shape[0] if len(shape) > 1 else 1) if shape.numel() else 0 for name, shape in shapes.items()}
    sizes = {name: shape.numel() for name, shape in shapes.items()}
    floor = "pruning never empties an output unit (a row of a weight) or a layer (its last channel or head)"
    if scope == "global":
        total, kept = sum(sizes.values()), sum(rows.values())
        if total and round(sparsity * total) > total - kept:
            raise ValueError(
                f"sparsity {sparsity} cannot be met: {floor}, so {kept} of the {total} entries ranked together stay "
                f"and they can be pruned to at most {(total - kept) / total:.4f}"
            )
        return
    targets = sparsity if isinstance(sparsity, dict) else dict.fromkeys(shapes, sparsity)
    over = [
        f"{name!r} at {targets[name]} ({rows[name]} rows of {sizes[name] // rows[name]}) can be pruned to at most "
        f"{(sizes[name] - rows[name]) / sizes[name]:.4f}"
        for name in shapes
        if sizes[name] and round(targets.get(name, 0.0) * sizes[name]) > sizes[name] - rows[name]
    ]
    if over:
        raise ValueError(f"sparsity per layer cannot be met: {floor}; {'; '.join(over)}")


def _protect_row_tops(score: torch.Tensor) -> torch.Tensor:
    """``score`` with the highest entry of each row raised to ``+inf`` so that no ranking prunes it; a row
    pruned already (all ``-inf``) stays as it is."""
    if score.numel() == 0:
        return score
    protected = _rows(score).float().clone()
    best, where = protected.max(dim=1)
    alive = best > float("-inf")
    protected[alive.nonzero().squeeze(1), where[alive]] = float("inf")
    return protected.view(score.shape)


def threshold_masks(weights: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """The rule ``|w| > threshold``, except that the largest weight of every output unit (row) always survives:
    weights at or below the threshold in magnitude are pruned, and no row is emptied.

    Example:
        >>> threshold_masks({"w": torch.tensor([[0.3, -0.1], [0.05, -0.02]])}, 0.1)["w"].tolist()
        [[True, False], [True, False]]
    """
    return {
        name: (weight.abs() > threshold) | torch.isinf(_protect_row_tops(weight.detach().abs()))
        for name, weight in weights.items()
    }


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
