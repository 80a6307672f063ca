"""A plan applied to the weights and kept through training: pruned weights stay zero, shared ones stay shared."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress.auto.settings import LayerSetting, cluster_labels, prune_mask
from lightning_compress.clustering.kmeans import SharedWeights


class CompressedWeights:
    """The masks and shared values of the weights a plan compresses (by weight name), applied and kept.

    :meth:`apply` compresses each weight to its layer's setting, from where it is (masks only grow; the
    non-zeros are clustered anew); :meth:`keep` puts pruned weights back to zero and shared weights back on
    their cluster's mean (after each optimizer step), :meth:`share_gradients` gives each shared weight its
    cluster's summed gradient (before each step), as :class:`~lightning_compress.WeightClustering` trains.

    Example:
        >>> layer = torch.nn.Linear(8, 4)
        >>> weights = CompressedWeights({"weight": layer.weight})
        >>> weights.apply({"weight": LayerSetting(sparsity=0.5, bits=1)})
        >>> int((layer.weight == 0).sum()), len(layer.weight.unique())
        (16, 3)
    """

    def __init__(self, weights: Mapping[str, nn.Parameter], seed: int = 0) -> None:
        self.weights = dict(weights)
        self.seed = seed
        self.masks: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self._shared: dict[str, SharedWeights] = {}

    @torch.no_grad()
    def apply(self, plan: Mapping[str, LayerSetting]) -> None:
        """Compress each named weight to its setting: prune by magnitude, then cluster the non-zeros."""
        for name, setting in plan.items():
            weight = self.weights[name]
            self.masks[name] = prune_mask(weight, setting.sparsity, self.masks.get(name))
            weight.mul_(self.masks[name])
            labels = cluster_labels(weight, setting, estimate=False, seed=self.seed)
            if labels is None:
                self.labels.pop(name, None)
            else:
                self.labels[name] = labels
        self._share()
        self.keep()

    def _share(self) -> None:
        self._shared = {
            name: SharedWeights(labels.to(self.weights[name].device), _clusters(labels))
            for name, labels in self.labels.items()
        }

    @torch.no_grad()
    def keep(self) -> None:
        """Zero the pruned weights and set each shared weight to its cluster's mean."""
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)
        for name, shared in self._shared.items():
            shared.tie(self.weights[name])

    @torch.no_grad()
    def share_gradients(self) -> None:
        """Give every shared weight its cluster's summed gradient and every pruned weight none."""
        for name, mask in self.masks.items():
            grad = self.weights[name].grad
            if grad is not None:
                grad.mul_(mask)
        for name, shared in self._shared.items():
            grad = self.weights[name].grad
            if grad is not None:
                shared.share_gradient(grad)

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "labels": {name: labels.cpu() for name, labels in self.labels.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Masks and labels, beside the weights they belong to."""
        self.masks = {name: mask.to(self.weights[name].device) for name, mask in state["masks"].items()}
        self.labels = dict(state["labels"])
        self._share()


def _clusters(labels: torch.Tensor) -> int:
    """The number of cluster slots ``labels`` use (``-1``, a kept zero, is none of them)."""
    return int(labels.max()) + 1 if labels.numel() else 1
