"""What :class:`~lightning_compress.AutoCompression` may do to one layer, and doing it to a weight tensor.

A :class:`LayerSetting` prunes a fraction of a layer's weights by magnitude (every output unit keeps its
largest weight, as :func:`~lightning_compress.pruning.rank_masks` always does) and, with ``bits``, shares the
surviving weights among ``2**bits`` values found by k-means (Deep Compression's weight sharing, zeros kept
out), which the compressed format stores as a codebook with ``bits``-bit indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_compress.clustering.kmeans import SharedWeights, kmeans_labels
from lightning_compress.pruning.criteria import element_scores
from lightning_compress.pruning.masks import forget_pruned, rank_masks

#: The methods AutoCompression chooses among (each objective its own, see ``OBJECTIVE_METHODS``).
METHODS = ("pruning", "clustering", "channels", "int8")
#: Sparsities a layer may be pruned to (those that would empty an output unit are left out per layer).
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
#: Bits of the shared values' indices (``None``: each weight keeps its own float value).
BITS = (None, 8, 6, 5, 4, 3, 2)
#: The values k-means fits its centroids on when a setting's effect is estimated (see ``kmeans_labels``).
ESTIMATE_SAMPLES = 4096


@dataclass(frozen=True)
class LayerSetting:
    """One layer's compression: ``sparsity`` of its weights pruned, its non-zeros in ``2**bits`` shared values;
    or, for a channel group, ``channels`` of its output channels pruned, and ``bits=8`` where the model's layers
    compute in 8-bit integers (the ``int8`` method).

    Example:
        >>> LayerSetting(sparsity=0.9, bits=4).clusters
        16
        >>> LayerSetting(channels=0.5)
        LayerSetting(sparsity=0.0, bits=None, channels=0.5)
    """

    sparsity: float = 0.0
    bits: int | None = None
    channels: float = 0.0

    @property
    def clusters(self) -> int | None:
        """The shared values of the non-zero weights, or ``None`` for float weights."""
        return None if self.bits is None else 2**self.bits


def next_settings(method: str, current: LayerSetting, weight_shape: torch.Size) -> list[LayerSetting]:
    """``current`` and the settings ``method`` may take a layer of ``weight_shape`` to from there: higher
    sparsities (as far as every output unit keeps a weight) for ``"pruning"``, fewer bits for ``"clustering"``.

    Example:
        >>> [(s.sparsity, s.bits) for s in next_settings("pruning", LayerSetting(), torch.Size([4, 2]))]
        [(0.0, None), (0.5, None)]
        >>> [s.bits for s in next_settings("clustering", LayerSetting(0.9, 5), torch.Size([300, 784]))]
        [5, 4, 3, 2]
    """
    if method == "pruning":
        rows = weight_shape[0] if len(weight_shape) > 1 else 1
        most = 1.0 - rows / max(1, weight_shape.numel())  # one weight per output unit survives
        further = [LayerSetting(s, current.bits) for s in SPARSITIES if current.sparsity < s <= most + 1e-12]
    else:
        further = [LayerSetting(current.sparsity, b) for b in BITS[1:] if current.bits is None or b < current.bits]
    return [current, *further]


@torch.no_grad()
def prune_mask(weight: torch.Tensor, sparsity: float, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """The kept weights (``True``) of ``weight`` pruned by magnitude to ``sparsity``, none of ``pruned``'s revived."""
    scores = {"weight": element_scores(weight.detach(), "magnitude")}
    if pruned is not None:
        scores = forget_pruned(scores, {"weight": pruned})
    mask = rank_masks(scores, sparsity, scope="layer")["weight"]
    return mask if pruned is None else mask & pruned


@torch.no_grad()
def cluster_labels(weight: torch.Tensor, setting: LayerSetting, estimate: bool, seed: int = 0) -> torch.Tensor | None:
    """The shared value of each non-zero weight (k-means from evenly spaced centroids, zeros labelled -1), or
    ``None`` for float weights; ``estimate`` fits the centroids on :data:`ESTIMATE_SAMPLES` quantiles only."""
    if setting.clusters is None:
        return None
    samples = ESTIMATE_SAMPLES if estimate else None
    return kmeans_labels(weight, setting.clusters, "linear", seed=seed, max_samples=samples)


@torch.no_grad()
def compressed_weight(
    weight: torch.Tensor, setting: LayerSetting, seed: int = 0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight`` as ``setting`` would leave it (clusters estimated): pruned (to ``mask``, when given: the
    setting's :func:`prune_mask`), then each non-zero its centroid."""
    compressed = weight.detach() * (prune_mask(weight, setting.sparsity) if mask is None else mask)
    labels = cluster_labels(compressed, setting, estimate=True, seed=seed)
    if labels is not None:
        SharedWeights(labels.to(compressed.device), setting.clusters).tie(compressed)
    return compressed
