"""The ``Pruning`` callback: masks recomputed at epoch boundaries on a schedule, pruned weights kept at zero."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.arguments import check_argument, is_int, is_number
from lightning_compress.batches import first_training_input
from lightning_compress.pruning.criteria import CRITERIA, element_scores, taylor_scores
from lightning_compress.pruning.masks import (
    SCOPES,
    forget_pruned,
    n_of_m_masks,
    rank_masks,
    threshold_masks,
)
from lightning_compress.pruning.schedules import SCHEDULES, SparsitySchedule
from lightning_compress.pruning.structured import ChannelGroups
from lightning_compress.targets import TargetSpec, select_layers

GRANULARITIES = ("unstructured", "channel", "N:M such as '2:4'")
_AMOUNTS = "a number in [0, 1), a dict of layer name -> amount, or None (with threshold or a callable schedule)"
_SCHEDULE_KINDS = f"one of {', '.join(SCHEDULES)} or a callable epoch -> sparsity"
_N_OF_M = re.compile(r"^(\d+):(\d+)$")


class Pruning(L.Callback):
    """Prune the weights of Conv and Linear layers while training, to a target sparsity on a schedule.

    At the start of each pruning epoch the masks are recomputed from the importance ``criterion`` and
    written into the weights; after every optimizer step the pruned weights are set back to exactly
    zero (one fused multiply in a step post-hook, no forward hook, no renamed parameters:
    ``state_dict()`` keeps the keys of the unpruned model). Masks only grow: a pruned weight is never
    revived, even if a later target is lower. ``amount`` is the final fraction
    of the targeted weights (of their output channels, for channel granularity) that are pruned,
    reached at ``end_epoch``; it never compounds.

    Args:
        amount: target sparsity in [0, 1) of the targeted weights (for N:M it is implied), or a dict of
            layer names (as ``named_modules`` of the LightningModule gives them) to each layer's own
            sparsity, e.g. from :func:`~lightning_compress.pruning.sensitivity.layer_amounts`: those layers
            are the targets, each ranked on its own and following the schedule to its amount.
        criterion: ``"magnitude"`` (``|w|``), ``"l1"`` / ``"l2"`` (norm of each output channel, channel
            granularity), ``"taylor"`` (``|w * dL/dw|`` summed over the epoch before each pruning step),
            or ``"random"`` (seeded).
        granularity: ``"unstructured"``, ``"channel"`` (whole output channels, with everything they
            touch: bias, BatchNorm, the inputs of the next layers, residual partners; the output layer is
            never pruned), or ``"N:M"`` (at most N non-zeros in each group of M consecutive weights along
            the input dimension, e.g. ``"2:4"``).
        scope: ``"global"`` (one ranking across all targeted layers) or ``"layer"`` (each layer to ``amount``).
        schedule: ``"oneshot"``, ``"linear"``, ``"agp"`` (cubic, Zhu & Gupta) or a callable ``epoch -> sparsity``.
        start_epoch, end_epoch, frequency: pruning epochs ``start_epoch, start_epoch + frequency, ...,
            end_epoch``; ``end_epoch=None`` prunes during the first half of the epochs from ``start_epoch``
            on and leaves the second half to recover.
        targets, exclude: module types and module-name patterns (see ``select_layers``).
        threshold: the rule ``|w| > threshold`` instead of ``amount``.
        rewind_epoch: after each pruning step, surviving weights return to their values at the end of
            this epoch (lottery-ticket rewinding); it must come before ``start_epoch``.
        remove_channels: with channel granularity, remove the pruned channels physically at the end of
            fit (Torch-Pruning's DepGraph), leaving a smaller dense model with the same outputs.
        seed: seed of the random criterion.

    Example:
        >>> import lightning as L
        >>> pruning = Pruning(amount=0.9, schedule="agp", start_epoch=0, end_epoch=4)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=8, logger=False, callbacks=[pruning])
    """

    def __init__(
        self,
        amount: float | Mapping[str, float] | None = None,
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
        remove_channels: bool = False,
        seed: int = 0,
    ) -> None:
        check_argument("amount", amount, amount is None or isinstance(amount, Mapping) or is_number(amount), _AMOUNTS)
        check_argument("threshold", threshold, threshold is None or is_number(threshold), "a number >= 0 or None")
        check_argument("schedule", schedule, isinstance(schedule, str) or callable(schedule), _SCHEDULE_KINDS)
        check_argument("start_epoch", start_epoch, is_int(start_epoch), "an int >= 0")
        check_argument("end_epoch", end_epoch, end_epoch is None or is_int(end_epoch), "an int >= start_epoch or None")
        check_argument("frequency", frequency, is_int(frequency), "a positive int (epochs between pruning steps)")
        check_argument(
            "rewind_epoch",
            rewind_epoch,
            rewind_epoch is None or is_int(rewind_epoch),
            "an int in [0, start_epoch) or None",
        )
        self.n_of_m = _parse_granularity(granularity)
        channel = granularity == "channel"
        self.layer_amounts = (
            _check_layer_amounts(amount, targets, threshold, self.n_of_m) if isinstance(amount, Mapping) else None
        )
        if self.layer_amounts is not None:
            targets, amount = list(self.layer_amounts), max(self.layer_amounts.values())
        if criterion not in CRITERIA or (criterion in ("l1", "l2") and not channel):
            allowed = CRITERIA if channel else ("magnitude", "taylor", "random")
            raise ValueError(
                f"unknown criterion {criterion!r} for {granularity} pruning; use one of {', '.join(allowed)}"
                + (" (l1 and l2 rank whole channels: granularity='channel')" if criterion in ("l1", "l2") else "")
            )
        if remove_channels and not channel:
            raise ValueError(
                f"remove_channels=True removes whole channels, so it needs granularity='channel', not {granularity!r}"
            )
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
        if threshold is not None:
            if amount is not None:
                raise ValueError(f"give either amount ({amount}) or threshold ({threshold}), not both")
            if not threshold >= 0 or criterion != "magnitude" or granularity != "unstructured":  # NaN is not >= 0
                raise ValueError(
                    f"threshold={threshold} needs a value >= 0 with criterion='magnitude' and unstructured granularity"
                )
        elif self.n_of_m:
            n, m = self.n_of_m
            if amount is not None and abs(amount - (m - n) / m) > 1e-9:
                raise ValueError(
                    f"granularity {granularity!r} means sparsity {(m - n) / m}; amount={amount} contradicts it (leave it out)"
                )
            amount = (m - n) / m
        elif amount is None and not callable(schedule):
            raise ValueError("give amount, the target sparsity in [0, 1), or threshold (or a callable schedule)")
        if amount is not None and not 0.0 <= amount < 1.0:
            raise ValueError(f"amount must be in [0, 1), got {amount}")
        # The schedule checks its own settings (kind, start_epoch, end_epoch, frequency) now, before training.
        SparsitySchedule(
            amount or 0.0, schedule, start_epoch, start_epoch if end_epoch is None else end_epoch, frequency
        )
        if criterion == "taylor" and start_epoch == 0:
            raise ValueError(
                "criterion='taylor' accumulates |w * grad| over the epoch before each pruning step, so start_epoch must be >= 1"
            )
        if rewind_epoch is not None and not 0 <= rewind_epoch < start_epoch:
            raise ValueError(
                f"rewind_epoch must be in [0, start_epoch={start_epoch}) so its weights exist before pruning starts, got {rewind_epoch}"
            )
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
        self.remove_channels = remove_channels
        self.seed = seed
        self.schedule: SparsitySchedule | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self.channel_keep: dict[str, torch.Tensor] = {}
        self.pruned_epochs: list[int] = []
        self.channel_groups: ChannelGroups | None = None
        self._parameters: dict[str, nn.Parameter] = {}
        self._all_parameters: dict[str, nn.Parameter] = {}
        self._step_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._rewind_weights: dict[str, torch.Tensor] = {}
        self._taylor: dict[str, torch.Tensor] = {}

    # --- setup: which weights, which epochs --------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        layers = select_layers(pl_module, self.targets, self.exclude)
        self._parameters = {f"{name}.weight": module.weight for name, module in layers.items()}
        self._all_parameters = dict(pl_module.named_parameters())
        if self.n_of_m:
            self._drop_layers_without_n_of_m_groups()
        if self.granularity == "channel" and self.channel_groups is None:
            example = getattr(pl_module, "example_input_array", None)
            if not isinstance(example, torch.Tensor):
                example = first_training_input(trainer)
            if example is None:
                raise ValueError(
                    f"channel pruning traces the model on one input: set `example_input_array` on {type(pl_module).__name__}, "
                    "or fit with a LightningDataModule, whose first training batch is then traced"
                )
            self.channel_groups = ChannelGroups(pl_module, example.to(pl_module.device), layers)
        if self.layer_amounts is not None:
            prunable = self.channel_groups.channels if self.channel_groups is not None else layers
            left_out = [layer for layer in self.layer_amounts if layer not in prunable]
            if left_out:
                raise ValueError(
                    f"amount per layer names {left_out}, which this pruning would leave as they are (excluded, or not the "
                    f"root of a channel group: the output layer never is); it can prune {list(prunable)}"
                )
        if stage == "fit":
            end_epoch = self._end_epoch(trainer)
            if not trainer.fast_dev_run and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= end_epoch:
                rank_zero_warn(
                    f"Pruning runs until end_epoch={end_epoch} (start_epoch={self.start_epoch}), but this fit stops "
                    f"after max_epochs={trainer.max_epochs}: the target is reached only if training is resumed further"
                )
            self.schedule = SparsitySchedule(
                self.amount or 0.0, self.schedule_kind, self.start_epoch, end_epoch, self.frequency
            )

    def _drop_layers_without_n_of_m_groups(self) -> None:
        """Skip (default targets) or refuse (explicit targets) weights whose input dimension is not a multiple of M."""
        n, m = self.n_of_m
        unfit = [name for name, weight in self._parameters.items() if weight.dim() < 2 or weight.shape[1] % m]
        if unfit and self.targets is not None:
            shapes = {name: tuple(self._parameters[name].shape) for name in unfit}
            raise ValueError(
                f"{n}:{m} sparsity needs the input dimension of each target divisible by {m}; these are not: {shapes}"
            )
        if len(unfit) == len(self._parameters):
            raise ValueError(f"{n}:{m} sparsity needs input dimensions divisible by {m}; no targeted layer has one")
        if unfit:
            rank_zero_warn(f"Pruning {n}:{m}: leaving {unfit} dense, their input dimension is not a multiple of {m}")
        self._parameters = {name: weight for name, weight in self._parameters.items() if name not in unfit}

    def _end_epoch(self, trainer: L.Trainer) -> int:
        if self.schedule is not None:  # resolved at the first fit: a resumed or second fit keeps it
            return self.schedule.end_epoch
        if self.end_epoch is not None or self.schedule_kind == "oneshot":
            return self.end_epoch if self.end_epoch is not None else self.start_epoch
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise ValueError("Pruning needs end_epoch when the Trainer has no max_epochs")
        return max(self.start_epoch, self.start_epoch + (max_epochs - self.start_epoch) // 2 - 1)

    def final_epoch(self) -> int:
        """The epoch of the last pruning step: from its end on, the masks are final (set at setup for fit)."""
        if self.schedule is None:
            raise RuntimeError("Pruning.final_epoch() is known once the callback is set up for fit")
        return self.schedule.end_epoch

    # --- training hooks ----------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # State restored from a checkpoint arrives on the CPU; keep it beside the weights it masks.
        self.masks = self._beside_weights(self.masks)
        self._rewind_weights = self._beside_weights(self._rewind_weights)
        self._taylor = self._beside_weights(self._taylor)
        self._step_hooks = [
            optimizer.register_step_post_hook(lambda *_: self.apply_masks()) for optimizer in trainer.optimizers
        ]

    def _beside_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self._all_parameters[name].device) for name, tensor in tensors.items()}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.schedule.pruning_epochs() and epoch not in self.pruned_epochs:
            self._prune(trainer, epoch)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients here are whole (accumulated) and unscaled under mixed precision; skip a step that overflowed.
        if self.criterion == "taylor" and trainer.current_epoch + 1 in self.schedule.pruning_epochs():
            scores = {
                name: taylor_scores(weight) for name, weight in self._parameters.items() if weight.grad is not None
            }
            if all(torch.isfinite(score).all() for score in scores.values()):
                for name, score in scores.items():
                    self._taylor[name] = self._taylor[name] + score if name in self._taylor else score

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.rewind_epoch:
            self._rewind_weights = {name: weight.detach().clone() for name, weight in self._parameters.items()}

    # --- the pruning step --------------------------------------------------------------------------

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight (one fused multiply over all masked tensors)."""
        if self.masks:
            names = list(self.masks)
            torch._foreach_mul_([self._all_parameters[name] for name in names], [self.masks[name] for name in names])

    @torch.no_grad()
    def _prune(self, trainer: L.Trainer, epoch: int) -> None:
        weights = {name: weight.detach() for name, weight in self._parameters.items()}
        if self.threshold is not None:
            masks = threshold_masks(weights, self.threshold)
        elif self.channel_groups is not None:
            masks = self._channel_masks(trainer, epoch)
        else:
            scores = forget_pruned(self._scores(trainer, weights, epoch), self.masks)
            if self.n_of_m:
                masks = n_of_m_masks(scores, *self.n_of_m)
            else:
                masks = rank_masks(scores, *self._target(epoch, suffix=".weight"))
        masks = {
            name: mask & self.masks[name] if name in self.masks else mask for name, mask in masks.items()
        }  # never revive
        self.masks = self._beside_weights(
            trainer.strategy.broadcast({name: mask.cpu() for name, mask in masks.items()}, src=0)
        )
        self._taylor = {}
        self.apply_masks()
        if self._rewind_weights:
            for name, weight in self._parameters.items():
                weight.copy_(self._rewind_weights[name] * self.masks.get(name, True))
        self.pruned_epochs.append(epoch)
        self._log(trainer)

    def _channel_masks(self, trainer: L.Trainer, epoch: int) -> dict[str, torch.Tensor]:
        """Rank channel groups (scores normalized by each group's mean, so layers compare) and mask what they touch."""
        scores = self.channel_groups.scores(
            self.criterion, self._reduced_taylor(trainer, epoch), self._generator(epoch)
        )
        scores = {name: score / score.mean().clamp_min(1e-12) for name, score in scores.items()}
        keep = rank_masks(forget_pruned(scores, self.channel_keep), *self._target(epoch, suffix=""), min_keep=1)
        keep = {
            name: kept & self.channel_keep[name] if name in self.channel_keep else kept for name, kept in keep.items()
        }
        self.channel_keep = trainer.strategy.broadcast(keep, src=0)
        return self.channel_groups.masks(self.channel_keep)

    def _target(self, epoch: int, suffix: str) -> tuple[float | dict[str, float], str]:
        """Sparsity and scope of the masks at ``epoch``; with amounts per layer, each layer (its name plus
        ``suffix``) gets its amount times the schedule's progress, ranked on its own."""
        overall = self.schedule.sparsity_at(epoch)
        if self.layer_amounts is None:
            return overall, self.scope
        progress = overall / self.amount if self.amount else 0.0
        return {f"{layer}{suffix}": amount * progress for layer, amount in self.layer_amounts.items()}, "layer"

    def _generator(self, epoch: int) -> torch.Generator:
        """The random criterion's generator: the same on every rank and after a restart."""
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch)

    def _reduced_taylor(self, trainer: L.Trainer, epoch: int) -> dict[str, torch.Tensor]:
        if self.criterion != "taylor":
            return {}
        if not self._taylor:
            raise RuntimeError(
                f"no gradients were seen in epoch {epoch - 1}, so there is no Taylor importance to prune by"
            )
        return {name: trainer.strategy.reduce(score, reduce_op="sum") for name, score in self._taylor.items()}

    def _scores(self, trainer: L.Trainer, weights: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        taylor, generator = self._reduced_taylor(trainer, epoch), self._generator(epoch)
        return {
            name: element_scores(weight, self.criterion, taylor.get(name), generator)
            for name, weight in weights.items()
        }

    def sparsity(self) -> dict[str, float]:
        """``{"pruning/sparsity": global, "pruning/sparsity/<weight>": per layer}``: the targeted weights' fraction of exact zeros.

        The zeros are counted in the weights themselves (each tensor once), not in the masks: a NaN weight
        stays NaN under a mask of 0, and is not counted as pruned.
        """
        pruned = {name: int((weight.detach() == 0).sum()) for name, weight in self._parameters.items()}
        sizes = {name: weight.numel() for name, weight in self._parameters.items()}
        metrics = {"pruning/sparsity": sum(pruned.values()) / sum(sizes.values())}
        metrics.update({f"pruning/sparsity/{name}": pruned[name] / sizes[name] for name in self._parameters})
        return metrics

    def _log(self, trainer: L.Trainer) -> None:
        metrics = self.sparsity()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # --- end of training and checkpoint state -------------------------------------------------------

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``remove_channels``, cut the pruned channels out: the module gets smaller layers.

        This runs when training ends, before any ``on_fit_end``, so a ``CompressionReport`` measures
        the smaller model wherever it stands in the callback list.
        """
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks = []
        if self.remove_channels and self.channel_keep:
            self.channel_groups.remove(self.channel_keep)
            self.masks, self.channel_keep, self._rewind_weights = {}, {}, {}
            self._parameters = {name: p for name, p in pl_module.named_parameters() if name in self._parameters}
            self._all_parameters = dict(pl_module.named_parameters())

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            amount=self.layer_amounts or self.amount,
            criterion=self.criterion,
            granularity=self.granularity,
            targets=str(self.targets),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "end_epoch": self.schedule.end_epoch if self.schedule is not None else None,
            "masks": self.masks,
            "channel_keep": self.channel_keep,
            "pruned_epochs": list(self.pruned_epochs),
            "rewind_weights": self._rewind_weights,
            "taylor": self._taylor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["end_epoch"] is not None and self.schedule is not None:
            self.schedule = dataclasses.replace(self.schedule, end_epoch=state_dict["end_epoch"])
        self.masks = dict(state_dict["masks"])
        self.channel_keep = dict(state_dict["channel_keep"])
        self.pruned_epochs = list(state_dict["pruned_epochs"])
        self._rewind_weights = dict(state_dict["rewind_weights"])
        self._taylor = dict(state_dict["taylor"])


def _check_layer_amounts(
    amounts: Mapping[str, float], targets: TargetSpec, threshold: float | None, n_of_m: tuple[int, int] | None
) -> dict[str, float]:
    """Amounts per layer name, each in [0, 1); they name the targets, so targets, threshold and N:M are out."""
    if targets is not None or threshold is not None or n_of_m:
        raise ValueError(
            "amount per layer names the layers and their sparsity itself: leave out targets, threshold and N:M granularity"
        )
    not_numbers = {layer: amount for layer, amount in amounts.items() if not is_number(amount)}
    if not_numbers:
        kinds = ", ".join(
            f"{amount!r} ({type(amount).__name__}) for {layer!r}" for layer, amount in not_numbers.items()
        )
        raise ValueError(f"amount per layer needs a number in [0, 1) for each layer; got {kinds}")
    amounts = {str(layer): float(amount) for layer, amount in amounts.items()}
    bad = {layer: amount for layer, amount in amounts.items() if not 0.0 <= amount < 1.0}
    if not amounts or bad:
        raise ValueError(f"amount per layer needs at least one layer, each amount in [0, 1); got {bad or amounts}")
    return amounts


def _parse_granularity(granularity: str) -> tuple[int, int] | None:
    """``None`` for unstructured and channel, ``(n, m)`` for an ``"N:M"`` pattern with 0 < N < M."""
    if granularity in ("unstructured", "channel"):
        return None
    match = _N_OF_M.match(granularity)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"unknown granularity {granularity!r}; use {' or '.join(GRANULARITIES)} with 0 < N < M")
    return int(match[1]), int(match[2])
