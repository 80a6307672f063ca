"""The surviving weights of a pruned linear layer solved exactly for the outputs of the model before pruning.

SparseGPT settles columns left to right, so each pruned weight's error moves only the weights right of it; once a
mask is chosen, the best surviving weights for the layer's calibration outputs are the solution of one least-squares
problem per output row (the exact weight update for a fixed mask: Boža, "Fast and Effective Weight Update for
Pruned Large Language Models", 2024). Aimed at the dense model's outputs rather than the layer's own, each layer
also makes up for the error of the layers pruned before it (the asymmetric calibration of GPTAQ, Li et al., 2025).
Solved here by preconditioned conjugate gradients on every row at once, so memory stays a few matrices the size of
the weight and of the Gram matrix, whatever the mask."""

from __future__ import annotations

import torch

#: How strongly the solution is pulled towards the weights before pruning: this fraction of the Gram matrix's mean
#: diagonal, a ridge that keeps a layer with fewer calibration rows than input features from fitting their noise.
RECONSTRUCTION_DAMPING = 0.3
#: Conjugate gradients stop when every row's residual is this small against its right-hand side.
TOLERANCE = 1e-6


@torch.no_grad()
def reconstruct_surviving_weights(
    original: torch.Tensor,
    keep: torch.Tensor,
    gram: torch.Tensor,
    damping: float = RECONSTRUCTION_DAMPING,
    cross: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights ``ŵ`` ``(out, in)``, zero where ``keep`` is ``False``, that minimize for each output row
    ``||X_ref w - X ŵ||² / n + λ ||ŵ - w||²``: the squared distance of the row's outputs on the calibration
    inputs ``X`` (``gram``, their Gram matrix ``H = XᵀX / n``) from the outputs of the ``original`` weights ``w``
    on the reference inputs ``X_ref`` (``cross``, ``X_refᵀX / n``; without it ``X_ref = X``), plus a ridge
    towards ``w`` with ``λ = damping · mean(diag H)``. With a reference, the model before compression, the
    layer also makes up for what the layers compressed before it changed in its inputs.

    On the surviving set ``S`` of a row this is the linear system ``(H + λI)_SS ŵ_S = (C w + λ w)_S`` (``C``:
    ``cross``, or ``H``), solved for all rows together by conjugate gradients, preconditioned by
    ``((H + λI)⁻¹)_SS`` (the inverse of the whole matrix on the row's set: a third to a half of the steps the
    diagonal takes on MiniLM's layers), until every row's residual is within :data:`TOLERANCE` of its
    right-hand side (exact arithmetic needs at most ``in`` steps).

    Example:
        >>> inputs = torch.randn(512, 6, generator=torch.Generator().manual_seed(0))
        >>> inputs[:, 1] = inputs[:, 0] + 0.1 * inputs[:, 1]  # feature 1 nearly repeats feature 0
        >>> weight = torch.tensor([[1.0, 1.0, 0.5, 0.0, 0.0, 0.0]])
        >>> keep = torch.tensor([[True, False, True, True, True, True]])
        >>> solved = reconstruct_surviving_weights(weight, keep, inputs.T @ inputs / 512, damping=0.0)
        >>> [round(value, 1) for value in solved[0, :3].tolist()]  # feature 0 takes over for the pruned feature 1
        [2.0, 0.0, 0.5]
    """
    hessian = gram.double().clone()
    ridge = damping * float(hessian.diagonal().mean())
    hessian.diagonal().add_(ridge)
    mask = keep.to(torch.float64)
    weights = original.double()
    tiny = torch.finfo(torch.float64).tiny

    def product(rows: torch.Tensor) -> torch.Tensor:  # (H + λI)_SS x_S for every row, zero off S
        return (rows @ hessian) * mask

    right_hand_side = product(weights) if cross is None else (weights @ cross.double() + ridge * weights) * mask
    scale = right_hand_side.norm(dim=1).clamp_min(tiny)
    inverse, info = torch.linalg.inv_ex(hessian)
    if int(info) != 0:
        raise ValueError(
            f"the calibration inputs' Gram matrix is singular with damping={damping:g}: give a damping > 0"
        )

    def precondition(rows: torch.Tensor) -> torch.Tensor:
        return (rows @ inverse) * mask

    solution = weights * mask
    residual = right_hand_side - product(solution)
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    alignment = (residual * preconditioned).sum(1)
    for _ in range(original.shape[1]):
        if bool((residual.norm(dim=1) <= TOLERANCE * scale).all()):
            break
        curved = product(direction)
        curvature = (direction * curved).sum(1)
        step = torch.where(curvature > 0, alignment / curvature.clamp_min(tiny), 0.0)
        solution += step.unsqueeze(1) * direction
        residual -= step.unsqueeze(1) * curved
        preconditioned = precondition(residual)
        new_alignment = (residual * preconditioned).sum(1)
        ratio = torch.where(alignment > 0, new_alignment / alignment.clamp_min(tiny), 0.0)
        direction = preconditioned + ratio.unsqueeze(1) * direction
        alignment = new_alignment
    return solution.to(original.dtype)
