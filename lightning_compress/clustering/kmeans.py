"""Weight clustering in plain PyTorch: k-means labels for a weight tensor (scikit-learn's ``KMeans``), and the
shared-weight update that keeps every weight on its cluster's centroid (Deep Compression, Han et al. 2016)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

#: The initializations of the centroids: k-means++ (seeded), ``linear`` (evenly spaced between the smallest
#: and the largest weight, Deep Compression's best) and ``density`` (at evenly spaced quantiles of the weights).
INITS = ("kmeans++", "linear", "density")

#: The label of a zero that sparsity-preserving clustering keeps at zero, outside every cluster.
KEPT_ZERO = -1


def kmeans_labels(
    weight: torch.Tensor,
    clusters: int,
    init: str = "kmeans++",
    per_channel: bool = False,
    preserve_zeros: bool = True,
    seed: int = 0,
    max_samples: int | None = None,
) -> torch.Tensor:
    """The cluster of each weight: an ``int16`` tensor of ``weight``'s shape, labels ``0 .. clusters - 1``.

    k-means runs on the whole tensor, or with ``per_channel`` on each slice along dimension 0 (an output
    channel of a Conv or Linear weight) on its own, labels counting within the slice. Labels follow the
    order of the centroids (label 0 has the smallest). A tensor (slice) with fewer distinct values than
    ``clusters`` gets one cluster per value. With ``preserve_zeros`` the exact zeros (pruned weights) take
    no part in k-means and get the label ``KEPT_ZERO`` (-1): they stay zero and are not a centroid.
    KMeans is seeded with ``seed`` (one run, ``n_init=1``), so the same weights give the same labels.
    ``max_samples`` fits the centroids on at most that many of the values, evenly spaced in sorted order (the
    values' quantiles, so the fit sees their distribution), and gives every value its nearest centroid: for a
    quick estimate of what clustering a large tensor does.

    Example:
        >>> weight = torch.tensor([[0.0, 0.1, 0.12, 0.9], [1.0, 0.0, 0.11, 0.88]])
        >>> kmeans_labels(weight, clusters=2, init="linear")
        tensor([[-1,  0,  0,  1],
                [ 1, -1,  0,  1]], dtype=torch.int16)
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    values = weight.detach().cpu().to(torch.float64)
    slices = values.reshape(values.shape[0], -1) if per_channel else values.reshape(1, -1)
    labels = np.full(slices.shape, KEPT_ZERO, dtype=np.int16)
    # Output channels are small slices: one thread each, rather than starting OpenMP's threads for every one.
    with threadpool_limits(1, user_api="openmp") if per_channel else nullcontext():
        for row, slice_values in enumerate(slices.numpy()):
            clustered = slice_values != 0 if preserve_zeros else np.ones(slice_values.shape, dtype=bool)
            if clustered.any():
                labels[row, clustered] = _kmeans_1d(slice_values[clustered], clusters, init, seed, max_samples)
    return torch.from_numpy(labels).reshape(weight.shape)


def _kmeans_1d(values: np.ndarray, clusters: int, init: str, seed: int, max_samples: int | None = None) -> np.ndarray:
    """Labels of 1-D ``values`` in at most ``clusters`` clusters, numbered in the order of their centroids; the
    centroids fit on at most ``max_samples`` evenly spaced order statistics of ``values``."""
    distinct = np.unique(values)
    if distinct.size <= clusters:
        return np.searchsorted(distinct, values)
    fitted = values
    if max_samples is not None and values.size > max_samples:
        fitted = np.sort(values)[np.linspace(0, values.size - 1, max(max_samples, clusters)).round().astype(np.int64)]
    if init == "kmeans++":
        start: str | np.ndarray = "k-means++"
    elif init == "linear":
        start = np.linspace(values.min(), values.max(), clusters).reshape(-1, 1)
    else:  # density
        start = np.quantile(values, (np.arange(clusters) + 0.5) / clusters).reshape(-1, 1)
    kmeans = KMeans(n_clusters=clusters, init=start, n_init=1, random_state=seed).fit(fitted.reshape(-1, 1))
    rank = np.empty(clusters, dtype=np.int64)
    rank[np.argsort(kmeans.cluster_centers_.ravel(), kind="stable")] = np.arange(clusters)
    labels = kmeans.labels_ if fitted is values else kmeans.predict(values.reshape(-1, 1))
    return rank[labels]


class SharedWeights:
    """The weights of one tensor tied to their clusters' centroids: the shared-weight update of Deep Compression.

    The centroids are not separate parameters: every weight holds its centroid's value, and the
    optimizer trains the weights. :meth:`share_gradient` gives each weight its cluster's summed
    gradient, the gradient of the centroid (``dL/dc = sum of dL/dw`` over its weights), so identical
    weights take identical steps; :meth:`tie` sets each weight to its cluster's mean, so they stay
    identical also where an optimizer's own state differs between them (Adam's moments from before
    the clustering). Kept zeros (label -1) have a slot of their own pinned at zero: no gradient, value 0.
    The sums are ``scatter_add_``, deterministic on the CPU and, with ``torch.use_deterministic_algorithms``
    (``Trainer(deterministic=True)``), on CUDA.

    Example:
        >>> labels = torch.tensor([[0, 1, -1], [1, 0, 0]], dtype=torch.int16)
        >>> shared = SharedWeights(labels, clusters=2)
        >>> weight = torch.tensor([[1.0, 4.0, 0.0], [6.0, 3.0, 2.0]])
        >>> shared.tie(weight)
        >>> weight
        tensor([[2., 5., 0.],
                [5., 2., 2.]])
        >>> grad = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
        >>> shared.share_gradient(grad)
        >>> grad
        tensor([[1.2000, 0.6000, 0.0000],
                [0.6000, 1.2000, 1.2000]])
    """

    def __init__(self, labels: torch.Tensor, clusters: int, per_channel: bool = False) -> None:
        index = labels.long()
        slots = clusters
        if per_channel:
            rows = labels.shape[0]
            index = index + torch.arange(rows, device=labels.device).reshape(rows, *[1] * (labels.dim() - 1)) * clusters
            slots = rows * clusters
        #: Each weight's slot in the flattened table of centroids; the last slot, ``slots``, is the kept zero.
        self.index = torch.where(labels < 0, slots, index).reshape(-1)
        self.counts = torch.bincount(self.index, minlength=slots + 1).clamp_min(1)

    def _sums(self, values: torch.Tensor) -> torch.Tensor:
        """Each slot's sum of ``values`` (in float32 at least), the kept zero's forced to 0."""
        dtype = torch.promote_types(values.dtype, torch.float32)
        sums = torch.zeros(self.counts.shape, dtype=dtype, device=values.device).scatter_add_(
            0, self.index, values.reshape(-1).to(dtype)
        )
        sums[-1] = 0
        return sums

    @torch.no_grad()
    def tie(self, weight: torch.Tensor) -> None:
        """Set every weight to the mean of its cluster (kept zeros to 0), in place."""
        weight.copy_((self._sums(weight) / self.counts)[self.index].reshape(weight.shape))

    @torch.no_grad()
    def share_gradient(self, grad: torch.Tensor) -> None:
        """Replace every weight's gradient by its cluster's summed gradient (kept zeros: 0), in place."""
        grad.copy_(self._sums(grad)[self.index].reshape(grad.shape))
