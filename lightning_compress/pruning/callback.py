"""The ``Pruning`` callback: masks recomputed at epoch boundaries on a schedule, pruned weights kept at zero."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.pruning.criteria import CRITERIA, element_scores, taylor_scores
from lightning_compress.pruning.masks import SCOPES, forget_pruned, n_of_m_masks, rank_masks, threshold_masks
from lightning_compress.pruning.schedules import SCHEDULES, SparsitySchedule
from lightning_compress.pruning.targets import TargetSpec, select_layers

GRANULARITIES = ("unstructured", "N:M such as '2:4'")
_N_OF_M = re.compile(r"^(\d+):(\d+)$")


class Pruning(L.Callback):
    """Prune the weights of Conv and Linear layers while training, to a target sparsity on a schedule.

    At the start of each pruning epoch the masks are recomputed from the importance ``criterion`` and
    written into the weights; after every training batch the pruned weights are set back to exactly
    zero (one fused multiply, no forward hook, no renamed parameters: ``state_dict()`` keeps the keys of
    the unpruned model), and optimizer state (momentum, Adam moments) of pruned weights is cleared when
    masks change. Masks only grow: a pruned weight is never revived. ``amount`` is the final fraction
    of the targeted weights that are zero, reached at ``end_epoch``; it never compounds.

    Args:
        amount: target sparsity in [0, 1) of the targeted weights (for N:M it is implied).
        criterion: ``"magnitude"`` (``|w|``), ``"taylor"`` (``|w * dL/dw|`` summed over the epoch before
            each pruning step), or ``"random"`` (seeded).
        granularity: ``"unstructured"`` or ``"N:M"`` (at most N non-zeros in each group of M consecutive
            weights along the input dimension, e.g. ``"2:4"``).
        scope: ``"global"`` (one ranking across all targeted layers) or ``"layer"`` (each layer to ``amount``).
        schedule: ``"oneshot"``, ``"linear"``, ``"agp"`` (cubic, Zhu & Gupta) or a callable ``epoch -> sparsity``.
        start_epoch, end_epoch, frequency: pruning epochs ``start_epoch, start_epoch + frequency, ...,
            end_epoch``; ``end_epoch=None`` prunes during the first half of the epochs from ``start_epoch``
            on and leaves the second half to recover.
        targets, exclude: module types and module-name patterns (see ``select_layers``).
        threshold: the rule ``|w| > threshold`` instead of ``amount``.
        rewind_epoch: after each pruning step, surviving weights return to their values at the end of
            this epoch (lottery-ticket rewinding); it must come before ``start_epoch``.
        seed: seed of the random criterion.

    Example:
        >>> import lightning as L
        >>> pruning = Pruning(amount=0.9, schedule="agp", start_epoch=0, end_epoch=4)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=8, logger=False, callbacks=[pruning])
    """

    def __init__(
        self,
        amount: float | None = None,
        criterion: str = "magnitude",
        granularity: str = "unstructured",
        scope: str = "global",
        schedule: str | Callable[[int], float] = "agp",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 1,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        threshold: float | None = None,
        rewind_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        self.n_of_m = _parse_granularity(granularity)
        if criterion not in CRITERIA or criterion in ("l1", "l2"):
            raise ValueError(
                f"unknown criterion {criterion!r} for {granularity} pruning; use one of magnitude, taylor, random"
                + (" (l1 and l2 rank whole channels)" if criterion in ("l1", "l2") else "")
            )
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)} or a callable epoch -> sparsity")
        if threshold is not None:
            if amount is not None:
                raise ValueError(f"give either amount ({amount}) or threshold ({threshold}), not both")
            if threshold < 0 or criterion != "magnitude" or self.n_of_m:
                raise ValueError(f"threshold={threshold} needs a value >= 0 with criterion='magnitude' and unstructured granularity")
        elif self.n_of_m:
            n, m = self.n_of_m
            if amount is not None and abs(amount - (m - n) / m) > 1e-9:
                raise ValueError(f"granularity {granularity!r} means sparsity {(m - n) / m}; amount={amount} contradicts it (leave it out)")
            amount = (m - n) / m
        elif amount is None:
            raise ValueError("give amount, the target sparsity in [0, 1), or threshold")
        if amount is not None and not 0.0 <= amount < 1.0:
            raise ValueError(f"amount must be in [0, 1), got {amount}")
        if start_epoch < 0 or frequency < 1:
            raise ValueError(f"start_epoch must be >= 0 and frequency >= 1, got start_epoch={start_epoch}, frequency={frequency}")
        if end_epoch is not None and end_epoch < start_epoch:
            raise ValueError(f"end_epoch ({end_epoch}) must not be before start_epoch ({start_epoch})")
        if criterion == "taylor" and start_epoch == 0:
            raise ValueError("criterion='taylor' accumulates |w * grad| over the epoch before each pruning step, so start_epoch must be >= 1")
        if rewind_epoch is not None and not 0 <= rewind_epoch < start_epoch:
            raise ValueError(f"rewind_epoch must be in [0, start_epoch={start_epoch}) so its weights exist before pruning starts, got {rewind_epoch}")
        self.amount = amount
        self.criterion = criterion
        self.granularity = granularity
        self.scope = scope
        self.schedule_kind = schedule
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.frequency = frequency
        self.targets = targets
        self.exclude = exclude
        self.threshold = threshold
        self.rewind_epoch = rewind_epoch
        self.seed = seed
        self.schedule: SparsitySchedule | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self.pruned_epochs: list[int] = []
        self._parameters: dict[str, nn.Parameter] = {}
        self._rewind_weights: dict[str, torch.Tensor] = {}
        self._taylor: dict[str, torch.Tensor] = {}

    # --- setup: which weights, which epochs --------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        layers = select_layers(pl_module, self.targets, self.exclude)
        self._parameters = {f"{name}.weight": module.weight for name, module in layers.items()}
        if self.n_of_m:
            self._drop_layers_without_n_of_m_groups()
        if stage == "fit":
            self.schedule = SparsitySchedule(
                amount=self.amount or 0.0,
                kind=self.schedule_kind,
                start_epoch=self.start_epoch,
                end_epoch=self._end_epoch(trainer),
                frequency=self.frequency,
            )

    def _drop_layers_without_n_of_m_groups(self) -> None:
        """Skip (default targets) or refuse (explicit targets) weights whose input dimension is not a multiple of M."""
        n, m = self.n_of_m
        unfit = [name for name, weight in self._parameters.items() if weight.dim() < 2 or weight.shape[1] % m]
        if unfit and self.targets is not None:
            shapes = {name: tuple(self._parameters[name].shape) for name in unfit}
            raise ValueError(f"{n}:{m} sparsity needs the input dimension of each target divisible by {m}; these are not: {shapes}")
        if unfit:
            rank_zero_warn(f"Pruning {n}:{m}: leaving {unfit} dense, their input dimension is not a multiple of {m}")
        self._parameters = {name: weight for name, weight in self._parameters.items() if name not in unfit}

    def _end_epoch(self, trainer: L.Trainer) -> int:
        if self.end_epoch is not None or self.schedule_kind == "oneshot":
            return self.end_epoch if self.end_epoch is not None else self.start_epoch
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise ValueError("Pruning needs end_epoch when the Trainer has no max_epochs")
        return max(self.start_epoch, self.start_epoch + (max_epochs - self.start_epoch) // 2 - 1)

    # --- training hooks ----------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # State restored from a checkpoint arrives on the CPU; keep it beside the weights it masks.
        self.masks = self._beside_weights(self.masks)
        self._rewind_weights = self._beside_weights(self._rewind_weights)
        self._taylor = self._beside_weights(self._taylor)

    def _beside_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self._parameters[name].device) for name, tensor in tensors.items()}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.schedule.pruning_epochs() and epoch not in self.pruned_epochs:
            self._prune(trainer, epoch)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.criterion == "taylor" and trainer.current_epoch + 1 in self.schedule.pruning_epochs():
            for name, weight in self._parameters.items():
                if weight.grad is not None:
                    score = taylor_scores(weight)
                    self._taylor[name] = self._taylor[name] + score if name in self._taylor else score

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.apply_masks()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.rewind_epoch:
            self._rewind_weights = {name: weight.detach().clone() for name, weight in self._parameters.items()}

    # --- the pruning step --------------------------------------------------------------------------

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight (one fused multiply over all masked tensors)."""
        if self.masks:
            names = list(self.masks)
            torch._foreach_mul_([self._parameters[name] for name in names], [self.masks[name] for name in names])

    @torch.no_grad()
    def _prune(self, trainer: L.Trainer, epoch: int) -> None:
        weights = {name: weight.detach() for name, weight in self._parameters.items()}
        if self.threshold is not None:
            masks = threshold_masks(weights, self.threshold)
            masks = {name: mask & self.masks[name] if name in self.masks else mask for name, mask in masks.items()}
        else:
            scores = forget_pruned(self._scores(trainer, weights, epoch), self.masks)
            if self.n_of_m:
                masks = n_of_m_masks(scores, *self.n_of_m)
            else:
                masks = rank_masks(scores, self.schedule.sparsity_at(epoch), self.scope)
        self.masks = self._beside_weights(trainer.strategy.broadcast({name: mask.to(torch.bool) for name, mask in masks.items()}, src=0))
        self._taylor = {}
        self.apply_masks()
        self._clear_optimizer_state(trainer)
        if self._rewind_weights:
            for name, weight in self._parameters.items():
                weight.copy_(self._rewind_weights[name] * self.masks[name])
        self.pruned_epochs.append(epoch)
        self._log(trainer)

    def _scores(self, trainer: L.Trainer, weights: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        taylor = {name: trainer.strategy.reduce(score, reduce_op="sum") for name, score in self._taylor.items()}
        if self.criterion == "taylor" and not taylor:
            raise RuntimeError(f"no gradients were seen in epoch {epoch - 1}, so there is no Taylor importance to prune by")
        return {name: element_scores(weight, self.criterion, taylor.get(name), generator) for name, weight in weights.items()}

    def _clear_optimizer_state(self, trainer: L.Trainer) -> None:
        """Zero momentum and moment estimates of pruned weights so an optimizer step cannot move them."""
        for optimizer in trainer.optimizers:
            for name, weight in self._parameters.items():
                for value in optimizer.state.get(weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                        value.mul_(self.masks[name])

    def sparsity(self) -> dict[str, float]:
        """``{"pruning/sparsity": global, "pruning/sparsity/<weight>": per layer}``, from the masks."""
        pruned = {name: int((~mask).sum()) for name, mask in self.masks.items()}
        total = sum(mask.numel() for mask in self.masks.values())
        metrics = {"pruning/sparsity": sum(pruned.values()) / total if total else 0.0}
        metrics.update({f"pruning/sparsity/{name}": pruned[name] / mask.numel() for name, mask in self.masks.items()})
        return metrics

    def _log(self, trainer: L.Trainer) -> None:
        metrics = self.sparsity()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # --- checkpoint state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks,
            "pruned_epochs": list(self.pruned_epochs),
            "rewind_weights": self._rewind_weights,
            "taylor": self._taylor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict["masks"])
        self.pruned_epochs = list(state_dict["pruned_epochs"])
        self._rewind_weights = dict(state_dict["rewind_weights"])
        self._taylor = dict(state_dict["taylor"])


def _parse_granularity(granularity: str) -> tuple[int, int] | None:
    """``None`` for unstructured, ``(n, m)`` for an ``"N:M"`` pattern with 0 < N < M."""
    if granularity == "unstructured":
        return None
    match = _N_OF_M.match(granularity)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"unknown granularity {granularity!r}; use {' or '.join(GRANULARITIES)} with 0 < N < M")
    return int(match[1]), int(match[2])
