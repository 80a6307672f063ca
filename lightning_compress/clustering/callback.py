"""The ``WeightClustering`` callback: weights clustered by k-means once, then the centroids fine-tuned with shared weights."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_compress.arguments import check_argument, is_int
from lightning_compress.clustering.kmeans import INITS, SharedWeights, kmeans_labels
from lightning_compress.finiteness import require_finite
from lightning_compress.pruning import Pruning
from lightning_compress.targets import TargetSpec, select_layers


class WeightClustering(L.Callback):
    """Cluster the weights of Conv and Linear layers into ``clusters`` shared values, then train the shared values.

    At the start of ``start_epoch`` each targeted weight tensor (or each output channel of it, with
    ``per_channel``) is clustered by k-means (:func:`kmeans_labels`, computed on rank zero and broadcast,
    so every process has the same clusters) and every weight is set to its cluster's centroid. From then
    on the clusters are fixed and the centroids train, as in Deep Compression (Han et al. 2016): before
    each optimizer step a weight's gradient is replaced by its cluster's summed gradient (the centroid's
    gradient), and after each step every weight is set to its cluster's mean, which keeps the weights of
    a cluster exactly equal under any optimizer (:class:`SharedWeights`). The model keeps its own
    parameters, so ``state_dict()`` has the keys of the plain model; a tensor ends with at most
    ``clusters`` distinct values (per output channel with ``per_channel``): what a codebook of centroids
    and ``log2(clusters)``-bit indices hold. With SGD a cluster's step is ``lr`` times its summed gradient,
    so large clusters move fast; Adam-style optimizers are invariant to that scale. Gradient clipping
    sees the shared gradients.

    With :class:`~lightning_compress.Pruning` in the same Trainer it must prune before ``start_epoch``;
    ``preserve_sparsity`` (TF Model Optimization's sparsity-preserving clustering) then leaves the exact
    zeros out of k-means and keeps them zero: they are not a cluster, the non-zeros of a tensor take at
    most ``clusters`` values. With :class:`~lightning_compress.QuantizationAwareTraining` the fake
    quantizer rounds the centroids, whose straight-through gradient trains them: each output channel of a
    quantized weight takes at most ``clusters`` integer codes (the whole tensor, when both the clustering
    and the quantization are per tensor), zeros (pruned) quantize to 0.

    Args:
        clusters: centroids per tensor (per output channel with ``per_channel``), 2 to 256 (8-bit indices).
        init: the centroids k-means starts from: ``"kmeans++"`` (seeded), ``"linear"`` (evenly spaced
            between the smallest and the largest weight) or ``"density"`` (at quantiles of the weights).
        start_epoch: the epoch at whose start the weights are clustered (``final_epoch()`` returns it); it
            must come before the Trainer's ``max_epochs``, checked at setup (``fast_dev_run`` is exempt).
        targets, exclude: module types and module-name patterns (see ``select_layers``).
        preserve_sparsity: keep the exact zeros zero, outside the clusters.
        per_channel: cluster each output channel (slice along dimension 0 of the weight) on its own.
        seed: the random state of k-means (its k-means++ start).

    Example:
        >>> import lightning as L
        >>> clustering = WeightClustering(clusters=16, init="linear", start_epoch=5)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=10, logger=False, callbacks=[clustering])
        >>> clustering.final_epoch()
        5
    """

    def __init__(
        self,
        clusters: int = 16,
        init: str = "kmeans++",
        start_epoch: int = 0,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        preserve_sparsity: bool = True,
        per_channel: bool = False,
        seed: int = 0,
    ) -> None:
        check_argument("clusters", clusters, is_int(clusters) and 2 <= clusters <= 256, "an int in [2, 256]")
        check_argument("init", init, isinstance(init, str) and init in INITS, f"one of {', '.join(INITS)}")
        check_argument("start_epoch", start_epoch, is_int(start_epoch) and start_epoch >= 0, "an int >= 0")
        check_argument("preserve_sparsity", preserve_sparsity, isinstance(preserve_sparsity, bool), "True or False")
        check_argument("per_channel", per_channel, isinstance(per_channel, bool), "True or False")
        check_argument("seed", seed, is_int(seed) and 0 <= seed < 2**32, "an int in [0, 2**32)")
        self.clusters = int(clusters)
        self.init = init
        self.start_epoch = int(start_epoch)
        self.targets = targets
        self.exclude = exclude
        self.preserve_sparsity = preserve_sparsity
        self.per_channel = per_channel
        self.seed = int(seed)
        #: The cluster of every targeted weight, by parameter name (``int16``, -1 for a kept zero); empty until clustered.
        self.labels: dict[str, torch.Tensor] = {}
        self._weights: dict[str, nn.Parameter] = {}
        self._shared: dict[str, SharedWeights] = {}
        self._step_hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def clustered(self) -> bool:
        """Whether the weights are clustered (from the start of ``start_epoch`` on)."""
        return bool(self.labels)

    def final_epoch(self) -> int:
        """The epoch of the clustering: from then on which weights share a value is fixed."""
        return self.start_epoch

    # --- setup: which weights, and whether this fit reaches start_epoch ------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        layers = select_layers(pl_module, self.targets, self.exclude)
        self._weights = {f"{name}.weight": module.weight for name, module in layers.items()}
        max_epochs = trainer.max_epochs
        if (
            stage == "fit"
            and not trainer.fast_dev_run
            and max_epochs is not None
            and 0 <= max_epochs <= self.start_epoch
        ):
            raise ValueError(
                f"start_epoch must be < max_epochs={max_epochs}, so that this fit clusters the weights; got {self.start_epoch}"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a Pruning that would move zeros once the clusters are fixed (all callbacks are set up now)."""
        for pruning in (callback for callback in trainer.callbacks if isinstance(callback, Pruning)):
            if not self.preserve_sparsity:
                raise ValueError(
                    "preserve_sparsity=False would cluster the zeros that Pruning keeps at zero; use preserve_sparsity=True with Pruning"
                )
            if pruning.final_epoch() >= self.start_epoch:
                raise ValueError(
                    f"start_epoch must be after Pruning's last step (epoch {pruning.final_epoch()}), as the clusters fix which "
                    f"weights are zero; got {self.start_epoch}"
                )

    # --- training hooks -----------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Labels restored from a checkpoint arrive on the CPU; the index goes beside the weights.
        self._share_labels()
        self._step_hooks = [
            optimizer.register_step_post_hook(lambda optimizer, *_: self.tie_weights(optimizer))
            for optimizer in trainer.optimizers
        ]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.clustered and trainer.current_epoch >= self.start_epoch:
            self._cluster(trainer)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients here are whole (accumulated), unscaled under mixed precision, not yet clipped.
        for name in self._held_by(optimizer):
            grad = self._weights[name].grad
            if grad is not None:
                self._shared[name].share_gradient(grad)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks = []

    # --- the clustering and the shared weights -------------------------------------------------------

    @torch.no_grad()
    def _cluster(self, trainer: L.Trainer) -> None:
        require_finite(self._weights, "WeightClustering clusters the weights")  # on every rank: the same weights
        labels = None
        if trainer.is_global_zero:
            labels = {
                name: kmeans_labels(
                    weight, self.clusters, self.init, self.per_channel, self.preserve_sparsity, self.seed
                )
                for name, weight in self._weights.items()
            }
        self.labels = trainer.strategy.broadcast(labels, src=0)
        self._share_labels()
        self.tie_weights()

    def _share_labels(self) -> None:
        self._shared = {
            name: SharedWeights(labels.to(self._weights[name].device), self.clusters, self.per_channel)
            for name, labels in self.labels.items()
        }

    def _held_by(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """The clustered weights that ``optimizer`` steps (each optimizer shares the gradients of its own)."""
        held = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
        return [name for name in self._shared if id(self._weights[name]) in held]

    def tie_weights(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set every clustered weight (those ``optimizer`` steps, if given) to the mean of its cluster."""
        for name in self._held_by(optimizer) if optimizer is not None else self._shared:
            self._shared[name].tie(self._weights[name])

    # --- checkpoint state ----------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            clusters=self.clusters, init=self.init, per_channel=self.per_channel, targets=str(self.targets)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"labels": {name: labels.cpu() for name, labels in self.labels.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.labels = dict(state_dict["labels"])
