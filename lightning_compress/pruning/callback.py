"""The ``Pruning`` callback: masks recomputed at epoch boundaries on a schedule, pruned weights kept at zero."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.arguments import check_argument, config_or_arguments, is_int
from lightning_compress.batches import first_training_input
from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.criteria import taylor_scores
from lightning_compress.pruning.pruner import Pruner
from lightning_compress.pruning.schedules import SCHEDULES, SparsitySchedule
from lightning_compress.targets import TargetSpec

_SCHEDULE_KINDS = f"one of {', '.join(SCHEDULES)} or a callable epoch -> sparsity"


class Pruning(L.Callback):
    """Prune the weights of Conv and Linear layers while training, to a target sparsity on a schedule.

    At the start of each pruning epoch the masks are recomputed from the importance ``criterion`` and
    written into the weights; after every optimizer step the pruned weights are set back to exactly
    zero (one fused multiply in a step post-hook, no forward hook, no renamed parameters:
    ``state_dict()`` keeps the keys of the unpruned model). Masks only grow: a pruned weight is never
    revived, even if a later target is lower. ``amount`` is the final fraction
    of the targeted weights (of their output channels, for channel granularity) that are pruned,
    reached at ``end_epoch``; it never compounds. What to prune is a :class:`PruningConfig` (``config``),
    made from the arguments; a plain-PyTorch :class:`Pruner` (``pruner``, built at setup) computes and
    applies the masks; the callback decides when.

    Args:
        amount: target sparsity in [0, 1) of the targeted weights (for N:M it is implied), or a dict of
            layer names (as ``named_modules`` of the LightningModule gives them) to each layer's own
            sparsity, e.g. from :func:`~lightning_compress.analysis.sensitivity.layer_amounts`: those layers
            are the targets, each ranked on its own and following the schedule to its amount.
        criterion: ``"magnitude"`` (``|w|``), ``"l1"`` / ``"l2"`` (norm of each output channel, channel
            granularity), ``"taylor"`` (``|w * dL/dw|`` summed over the optimizer steps since the previous pruning
            step, in the epoch before each pruning step; a step with no such steps before it, at epoch 0 or
            after a step that pruned at the end of its own epoch, sums the first ``taylor_steps`` of its own
            epoch and prunes after them),
            ``"random"`` (seeded), or a callable ``score(layer) -> Tensor`` of the weight's shape (your own
            importance; unstructured and N:M granularity).
        granularity: ``"unstructured"``, ``"channel"`` (whole output channels, with everything they
            touch: bias, BatchNorm, the inputs of the next layers, residual partners; the output layer is
            never pruned), ``"N:M"`` (at most N non-zeros in each group of M consecutive weights along
            the input dimension, e.g. ``"2:4"``), or ``"head"`` (whole attention heads: each head's
            channels of the query, key and value projections and its columns of the output projection;
            ``ExplicitMultiheadAttention`` and Hugging Face BERT-style attention).
        scope: ``"global"`` (one ranking across all targeted layers, by each score's standing in its own layer:
            LAMP scores for magnitude and Taylor, channel and head scores over their layer's mean) or ``"layer"``
            (each layer to ``amount``). Every output unit keeps its best weight (every layer one channel or head), so
            no layer is emptied; an amount that cannot leave them is refused at setup.
        schedule: ``"oneshot"``, ``"linear"``, ``"agp"`` (cubic, Zhu & Gupta) or a callable ``epoch -> sparsity``.
        start_epoch, end_epoch, frequency: pruning epochs ``start_epoch, start_epoch + frequency, ...,
            end_epoch``; ``end_epoch=None`` prunes during the first half of the epochs from ``start_epoch``
            on and leaves the second half to recover.
        targets, exclude: module types and module-name patterns (see ``select_layers``).
        threshold: the rule ``|w| > threshold`` instead of ``amount``.
        rewind_epoch: after each pruning step, surviving weights return to their values at the end of
            this epoch (lottery-ticket rewinding); it must come before ``start_epoch``.
        remove_channels: with channel or head granularity, remove the pruned channels (heads) physically at
            the end of fit (Torch-Pruning's DepGraph), leaving a smaller dense model with the same outputs.
        seed: seed of the random criterion.
        taylor_steps: with ``criterion="taylor"``, the optimizer steps of its own epoch whose gradients score a
            pruning step that has none before it (at epoch 0, or after epochs shorter than this); it prunes
            after them, or at the end of the epoch if the epoch is shorter. Every process counts the same
            steps, so all prune at the same step.
        config: what to prune as a :class:`PruningConfig`, instead of ``amount``, ``criterion``,
            ``granularity``, ``scope``, ``targets``, ``exclude``, ``threshold`` and ``seed`` (not both).

    Example:
        >>> import lightning as L
        >>> pruning = Pruning(amount=0.9, schedule="agp", start_epoch=0, end_epoch=4)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=8, logger=False, callbacks=[pruning])
    """

    def __init__(
        self,
        amount: float | Mapping[str, float] | None = None,
        criterion: str | Callable[[nn.Module], torch.Tensor] = "magnitude",
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
        taylor_steps: int = 16,
        *,
        config: PruningConfig | None = None,
    ) -> None:
        check_argument("schedule", schedule, isinstance(schedule, str) or callable(schedule), _SCHEDULE_KINDS)
        check_argument("start_epoch", start_epoch, is_int(start_epoch), "an int >= 0")
        check_argument("end_epoch", end_epoch, end_epoch is None or is_int(end_epoch), "an int >= start_epoch or None")
        check_argument("frequency", frequency, is_int(frequency), "a positive int (epochs between pruning steps)")
        check_argument(
            "taylor_steps", taylor_steps, is_int(taylor_steps) and taylor_steps >= 1, "an int >= 1 (optimizer steps)"
        )
        check_argument(
            "rewind_epoch",
            rewind_epoch,
            rewind_epoch is None or is_int(rewind_epoch),
            "an int in [0, start_epoch) or None",
        )
        self.config = config_or_arguments(
            config, PruningConfig(amount, criterion, granularity, scope, targets, exclude, threshold, seed)
        )
        if remove_channels and not self.config.structured:
            raise ValueError(
                "remove_channels=True removes whole channels or heads, so it needs granularity='channel' or 'head', "
                f"not {self.config.granularity!r}"
            )
        if self.config.final_amount is None and self.config.threshold is None and not callable(schedule):
            raise ValueError("give amount, the target sparsity in [0, 1), or threshold (or a callable schedule)")
        # The schedule checks its own settings (kind, start_epoch, end_epoch, frequency) now, before training.
        SparsitySchedule(
            self.config.final_amount or 0.0,
            schedule,
            start_epoch,
            start_epoch if end_epoch is None else end_epoch,
            frequency,
        )
        if rewind_epoch is not None and not 0 <= rewind_epoch < start_epoch:
            raise ValueError(
                f"rewind_epoch must be in [0, start_epoch={start_epoch}) so its weights exist before pruning starts, got {rewind_epoch}"
            )
        self.schedule_kind = schedule
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.frequency = frequency
        self.rewind_epoch = rewind_epoch
        self.remove_channels = remove_channels
        self.taylor_steps = taylor_steps
        self.schedule: SparsitySchedule | None = None
        self.pruner: Pruner | None = None
        self.pruned_epochs: list[int] = []
        self._step_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._rewind_weights: dict[str, torch.Tensor] = {}
        self._taylor: dict[str, torch.Tensor] = {}
        #: Optimizer steps whose gradients went into ``_taylor`` (or overflowed) since the last pruning step.
        self._scored_steps = 0
        #: The epoch whose pruning step waits for the gradients of the epoch's own first ``taylor_steps``.
        self._waiting_epoch: int | None = None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks by weight name (``False``: pruned); empty before the first pruning step."""
        return self.pruner.masks if self.pruner is not None else {}

    @property
    def channel_keep(self) -> dict[str, torch.Tensor]:
        """With channel (head) granularity, the kept output channels (heads) of each group's root layer."""
        return self.pruner.channel_keep if self.pruner is not None else {}

    # --- setup: which weights, which epochs --------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.pruner is None:
            example = None
            if self.config.structured:
                example = getattr(pl_module, "example_input_array", None)
                if example is None:
                    example = first_training_input(trainer)
                if example is None:
                    raise ValueError(
                        f"{self.config.granularity} pruning traces the model on one input: set `example_input_array` "
                        f"on {type(pl_module).__name__}, or fit it with one training dataloader, whose first batch is "
                        "then traced"
                    )
            self.pruner = Pruner(pl_module, self.config, example, warn=rank_zero_warn)
        if stage == "fit":
            end_epoch = self._end_epoch(trainer)
            if not trainer.fast_dev_run and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= end_epoch:
                rank_zero_warn(
                    f"Pruning runs until end_epoch={end_epoch} (start_epoch={self.start_epoch}), but this fit stops "
                    f"after max_epochs={trainer.max_epochs}: the target is reached only if training is resumed further"
                )
            self.schedule = SparsitySchedule(
                self.config.final_amount or 0.0, self.schedule_kind, self.start_epoch, end_epoch, self.frequency
            )

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
        self._rewind_weights = self._beside_weights(self._rewind_weights)
        self._taylor = self._beside_weights(self._taylor)
        self._step_hooks = [self.pruner.attach(optimizer) for optimizer in trainer.optimizers]

    def _beside_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.to(self.pruner.all_parameters[name].device) for name, tensor in tensors.items()}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.schedule.pruning_epochs() or epoch in self.pruned_epochs:
            return
        if self.config.criterion == "taylor" and (self._scored_steps == 0 or self._waiting_epoch == epoch):
            self._waiting_epoch = epoch  # scored by this epoch's first steps (a resumed epoch goes on waiting)
        else:
            self._prune(trainer, epoch)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients here are whole (accumulated) and unscaled under mixed precision; skip a step that overflowed.
        epoch = trainer.current_epoch
        if self.config.criterion != "taylor" or not (
            epoch + 1 in self.schedule.pruning_epochs() or self._waiting_epoch == epoch
        ):
            return
        scores = {
            name: taylor_scores(weight).float()  # summed in float32 under any precision
            for name, weight in self.pruner.parameters.items()
            if weight.grad is not None
        }
        if all(torch.isfinite(score).all() for score in scores.values()):
            for name, score in scores.items():
                self._taylor[name] = self._taylor[name] + score if name in self._taylor else score
        self._scored_steps += 1  # every process counts every step, so all decide alike

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._waiting_epoch == trainer.current_epoch and self._scored_steps >= self.taylor_steps:
            self._prune(trainer, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._waiting_epoch == trainer.current_epoch:  # an epoch shorter than taylor_steps
            self._prune(trainer, trainer.current_epoch)
        if trainer.current_epoch == self.rewind_epoch:
            self._rewind_weights = {name: weight.detach().clone() for name, weight in self.pruner.parameters.items()}

    # --- the pruning step --------------------------------------------------------------------------

    def apply_masks(self) -> None:
        """Zero every pruned weight (see :meth:`Pruner.apply`)."""
        self.pruner.apply()

    @torch.no_grad()
    def _prune(self, trainer: L.Trainer, epoch: int) -> None:
        """Prune to the schedule's sparsity at ``epoch``, rank zero's masks on every rank, then rewind and log."""
        self.pruner.prune(
            self.schedule.sparsity_at(epoch),
            taylor=self._reduced_taylor(trainer, epoch),
            generator=torch.Generator().manual_seed(
                self.config.seed * 100_003 + epoch
            ),  # the same on every rank, and after a restart
            share=lambda tensors: trainer.strategy.broadcast(tensors, src=0),
        )
        self._taylor, self._scored_steps, self._waiting_epoch = {}, 0, None
        if self._rewind_weights:
            for name, weight in self.pruner.parameters.items():
                weight.copy_(self._rewind_weights[name] * self.masks.get(name, True))
        self.pruned_epochs.append(epoch)
        self._log(trainer)

    def _reduced_taylor(self, trainer: L.Trainer, epoch: int) -> dict[str, torch.Tensor] | None:
        if self.config.criterion != "taylor":
            return None
        if not self._taylor:
            seen = f"the first steps of epoch {epoch}" if self._waiting_epoch == epoch else f"epoch {epoch - 1}"
            raise RuntimeError(
                f"no finite gradients of the pruned weights were seen in {seen}, so there is no Taylor importance to "
                "prune by"
            )
        return {name: trainer.strategy.reduce(score, reduce_op="sum") for name, score in self._taylor.items()}

    def sparsity(self) -> dict[str, float]:
        """``{"pruning/sparsity": global, "pruning/sparsity/<weight>": per layer}`` (see :meth:`Pruner.sparsity`)."""
        return self.pruner.sparsity()

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
            self.pruner.remove_channels(pl_module)
            self._rewind_weights = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            amount=self.config.amount,
            criterion=self.config.criterion,
            granularity=self.config.granularity,
            targets=str(self.config.layers),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "end_epoch": self.schedule.end_epoch if self.schedule is not None else None,
            "masks": self.masks,
            "channel_keep": self.channel_keep,
            "pruned_epochs": list(self.pruned_epochs),
            "rewind_weights": self._rewind_weights,
            "taylor": self._taylor,
            "scored_steps": self._scored_steps,
            "waiting_epoch": self._waiting_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.pruner is None:
            raise RuntimeError(
                "Pruning state loads into a callback set up for its model (Lightning restores after setup)"
            )
        if state_dict["end_epoch"] is not None and self.schedule is not None:
            self.schedule = dataclasses.replace(self.schedule, end_epoch=state_dict["end_epoch"])
        self.pruner.load_state_dict(state_dict)
        self.pruned_epochs = list(state_dict["pruned_epochs"])
        self._rewind_weights = dict(state_dict["rewind_weights"])
        self._taylor = dict(state_dict["taylor"])
        # Checkpoints from before the step count kept only the scores: any scores mean steps were scored.
        self._scored_steps = state_dict.get("scored_steps", len(self._taylor) and 1)
        self._waiting_epoch = state_dict.get("waiting_epoch")
