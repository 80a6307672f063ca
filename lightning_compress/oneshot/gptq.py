"""GPTQ (Frantar et al., 2023): round a linear layer's weights onto an integer grid column by column, moving the
columns still to be rounded so the layer's outputs on its calibration inputs change as little as possible."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_compress.oneshot.hessian import BLOCK_SIZE, inverse_hessian_factor, optimal_brain_surgeon
from lightning_compress.quantization.observers import Observer


@dataclass(frozen=True)
class WeightGrid:
    """Integer grids of a weight ``(out, in)``: a scale and zero point per output row and group of ``group_size``
    consecutive input columns (one group spanning the row with ``group_size=None``), integers in ``quant_range``.

    Example:
        >>> weight = torch.tensor([[7.0, -3.2, 2.9, 14.0]])
        >>> grid = WeightGrid.of(weight, (-7, 7), symmetric=True, group_size=2)
        >>> grid.scale.tolist(), grid.round(weight).tolist()
        ([[1.0, 2.0]], [[7.0, -3.0, 2.0, 14.0]])
    """

    scale: torch.Tensor  # (out, groups)
    zero_point: torch.Tensor  # (out, groups), int32
    quant_range: tuple[int, int]
    group_size: int | None

    @classmethod
    def of(
        cls, weight: torch.Tensor, quant_range: tuple[int, int], symmetric: bool, group_size: int | None = None
    ) -> WeightGrid:
        """The min-max grids of ``weight`` (zero always on the grid), as the project's weight quantizers make them."""
        rows, columns = weight.shape
        size = columns if group_size is None else group_size
        if columns % size:
            raise ValueError(f"group_size={group_size} must divide the {columns} input columns of the weight")
        groups = weight.detach().float().reshape(rows * (columns // size), size)
        observer = Observer("minmax", channels=groups.shape[0]).to(weight.device)
        observer(groups)
        scale, zero_point = observer.qparams(*quant_range, symmetric)
        return cls(scale.view(rows, -1), zero_point.view(rows, -1), quant_range, group_size)

    def column_grid(self, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point of every row at input column ``column``."""
        group = 0 if self.group_size is None else column // self.group_size
        return self.scale[:, group], self.zero_point[:, group]

    def round(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of the whole ``weight`` onto its grids (dequantized)."""
        rows, columns = weight.shape
        size = columns if self.group_size is None else self.group_size
        grouped = weight.float().reshape(rows, -1, size)
        return self._rounded(grouped, self.scale.unsqueeze(-1), self.zero_point.unsqueeze(-1)).reshape(rows, columns)

    def round_column(self, values: torch.Tensor, column: int) -> torch.Tensor:
        """Round-to-nearest of input column ``column`` of every row (dequantized)."""
        return self._rounded(values, *self.column_grid(column))

    def _rounded(self, values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        low, high = self.quant_range
        return ((torch.round(values / scale) + zero_point).clamp(low, high) - zero_point) * scale


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    gram: torch.Tensor,
    grid: WeightGrid,
    damping: float,
    layer: str,
    act_order: bool = False,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """``weight`` ``(out, in)`` rounded onto ``grid`` by GPTQ, dequantized: every value on its grid.

    ``gram`` is the mean outer product of the layer's calibration inputs
    (:class:`~lightning_compress.oneshot.hessian.InputGram`), damped by ``damping`` (``layer`` names it in the
    error a singular one raises). Rounding column ``i`` moves the columns after it by the optimal brain
    surgeon update; with ``act_order`` the columns are visited by decreasing input energy (the diagonal of
    ``gram``), the grids staying those of the original columns (GPTQ's static groups), so the result is stored
    like any weight on these grids.

    Example:
        >>> inputs = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
        >>> weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        >>> grid = WeightGrid.of(weight, (-7, 7), symmetric=True)
        >>> rounded = gptq_quantize(weight, inputs.T @ inputs / 256, grid, 0.01, "fc")
        >>> torch.equal(grid.round(rounded), rounded)  # on the grid
        True
    """
    columns = weight.shape[1]
    order = torch.argsort(gram.diagonal(), descending=True, stable=True) if act_order else torch.arange(columns)
    factor = inverse_hessian_factor(gram[order][:, order], damping, layer)
    remaining = optimal_brain_surgeon(
        weight[:, order],
        factor,
        lambda block, start, column: grid.round_column(block[:, column], int(order[start + column])),
        block_size,
    )
    result = torch.empty_like(remaining)
    result[:, order] = remaining
    return result.to(weight.dtype)
