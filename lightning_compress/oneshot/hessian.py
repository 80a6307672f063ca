"""What a linear layer's calibration inputs say about its weights: the mean outer product of its input rows
(the Hessian of its squared output error, up to a factor of 2) and the damped inverse that SparseGPT and GPTQ
update the remaining weights with."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: SparseGPT's and GPTQ's damping: this fraction of the Hessian's mean diagonal is added to its diagonal.
DAMPING = 0.01
#: Columns whose updates SparseGPT and GPTQ gather before applying them to the rest of the matrix (the papers' 128).
BLOCK_SIZE = 128


class InputGram:
    """The running mean ``XᵀX / n`` of the outer products of the ``n`` input rows a linear layer has read.

    Each row is one input vector (a token's, for a transformer): a batch ``(..., features)`` adds all its
    leading positions as rows. Kept in float32 as a running mean, so it neither overflows nor depends on
    how the rows were split into batches beyond rounding.

    With ``cross=True`` it also keeps ``X_refᵀX / n``, where each row of ``X_ref`` is what the same layer of a
    reference model (the model before compression) read at the same position: what solving a layer for the
    reference model's outputs needs.

    Example:
        >>> gram = InputGram(2)
        >>> gram.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> gram.matrix.tolist(), gram.rows
        ([[1.0, 1.0], [1.0, 2.0]], 2)
        >>> gram.feature_norms().tolist()  # Wanda's ||X_j||: each feature's norm over the rows
        [1.4142135381698608, 2.0]
    """

    def __init__(self, features: int, device: torch.device | str | None = None, cross: bool = False) -> None:
        self.matrix = torch.zeros(features, features, device=device)
        self.cross = torch.zeros(features, features, device=device) if cross else None
        self.rows = 0

    @torch.no_grad()
    def add(self, inputs: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Add every input row of ``inputs`` (``(..., features)``), and with ``cross`` the reference model's rows
        ``reference`` at the same positions."""
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        total = self.rows + rows.shape[0]
        if rows.shape[0] == 0:
            return
        self.matrix.mul_(self.rows / total).addmm_(rows.T, rows, alpha=1.0 / total)
        if self.cross is not None:
            reference_rows = reference.reshape(rows.shape).float()
            self.cross.mul_(self.rows / total).addmm_(reference_rows.T, rows, alpha=1.0 / total)
        self.rows = total

    def feature_norms(self) -> torch.Tensor:
        """The L2 norm of each input feature over every row seen (``||X_j||_2``, Wanda's activation norms)."""
        return (self.matrix.diagonal().clamp_min(0) * self.rows).sqrt()


def inverse_hessian_factor(gram: torch.Tensor, damping: float, layer: str) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``UᵀU``), ``λ = damping · mean(diag H)``.

    Row ``i`` of ``U`` from the diagonal on is what the optimal brain surgeon update needs when column ``i``
    of the weights is rounded or pruned and columns ``i+1, ...`` are still free (Frantar & Alistarh,
    SparseGPT and GPTQ). A feature that no calibration row ever used (a zero on the diagonal) gets a 1 there:
    its weights move no other weight and no other weight moves them. Factorized in float64; ``layer``
    names the layer in the error raised when the damped matrix is still singular.

    Example:
        >>> inverse_hessian_factor(torch.tensor([[4.0, 0.0], [0.0, 0.25]]), 0.0, "fc").diagonal().tolist()
        [0.5, 2.0]
    """
    hessian = gram.double().clone()
    diagonal = hessian.diagonal()
    unused = diagonal == 0
    if bool(unused.all()):
        raise ValueError(f"every calibration input of {layer!r} was zero: its weights cannot be ranked or rounded")
    diagonal[unused] = 1.0
    diagonal += damping * diagonal.mean()
    lower, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        inverse = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the Hessian of the inputs of {layer!r} is singular after damping={damping:g}: give a larger damping "
            f"(e.g. {max(damping * 10, 0.01):g}) or more calibration batches"
        )
    return upper.float()


#: What a column becomes: given the block of columns being visited (its weights as updated so far), the first
#: column of the block and the column's index in it, the column's new values (pruned, or rounded).
SettleColumn = Callable[[torch.Tensor, int, int], torch.Tensor]


@torch.no_grad()
def optimal_brain_surgeon(
    weight: torch.Tensor, factor: torch.Tensor, settle: SettleColumn, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """``weight`` ``(out, in)`` with its columns settled left to right by ``settle``, each settled column's error
    moving the columns right of it so the outputs on the calibration inputs change least (SparseGPT's and
    GPTQ's update, ``factor`` from :func:`inverse_hessian_factor`). The updates are applied a block of
    ``block_size`` columns at a time to the columns beyond the block (the papers' lazy batch).

    Example:
        >>> factor = inverse_hessian_factor(torch.eye(3), 0.0, "fc")
        >>> optimal_brain_surgeon(torch.tensor([[1.4, -0.6, 2.2]]), factor, lambda block, start, column: block[:, column].round()).tolist()
        [[1.0, -1.0, 2.0]]
    """
    columns = weight.shape[1]
    remaining = weight.detach().float().clone()
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, block_factor = remaining[:, start:end].clone(), factor[start:end, start:end]
        errors = torch.zeros_like(block)
        for column in range(end - start):
            settled = settle(block, start, column)
            error = (block[:, column] - settled) / block_factor[column, column]
            block[:, column:] -= error.unsqueeze(1) * block_factor[column, column:].unsqueeze(0)
            block[:, column] = settled
            errors[:, column] = error
        remaining[:, start:end] = block
        remaining[:, end:] -= errors @ factor[start:end, end:]
    return remaining
