"""``AutoCompression``: say what may be lost and what to minimize; get the per-layer plan, the trained model and
the proof on validation data."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_compress.arguments import check_argument, is_int, is_number
from lightning_compress.auto.allocation import cheapest_plan, least_damage_plan, plan_cost
from lightning_compress.auto.integer import INT8_METHOD
from lightning_compress.auto.margin import drop_margin, standard_errors, validation_classes
from lightning_compress.auto.objectives import OBJECTIVE_METHODS, OBJECTIVES, UNITS, Objective, objective_for
from lightning_compress.auto.sensitivity import Candidate
from lightning_compress.auto.settings import LayerSetting
from lightning_compress.auto.teacher import TeacherGradient
from lightning_compress.batches import ModelInputs, first_training_input, placed_like, training_inputs
from lightning_compress.modules import model_copy
from lightning_compress.targets import TargetSpec, select_layers

MODES = ("max", "min")
#: Until a level is rejected, each level is predicted to cost at most 1 / GROWTH of the last accepted one
#: (in a method's later rounds: its last step, which each kept level squares, up to GROWTH).
GROWTH = 2.0
#: After a rejection, levels halve the gap (geometrically) until the rejected one is within this factor.
RESOLUTION = 1.1
#: How many times a level's knapsack is solved again with a smaller budget when its plan's prediction is over.
ALLOCATION_ROUNDS = 8
#: The method of the epochs after the search: the kept level trains on, kept where it validates better.
RECOVERY = "recovery"


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is compressed: its setting (a fraction of its weights pruned, of its output channels pruned,
    its shared values' bits), its part of the objective predicted when the setting was chosen and as it is in the
    model (its weight's bytes in the compressed format, or its multiply-accumulates), and the damage predicted
    for the setting (the KL divergence the layer alone added to the model's predictions on the calibration
    batches).

    Example:
        >>> LayerPlan(sparsity=0.95, channels=0.0, bits=4, predicted_cost=9_802, cost=9_790, damage=0.031).bits
        4
    """

    sparsity: float
    channels: float
    bits: int | None
    predicted_cost: int
    cost: int
    damage: float


@dataclass(frozen=True)
class Level:
    """One level tried: the method it went further with (or ``"recovery"``, an epoch of the kept level after the
    search), its first epoch, the predicted ratio of the dense model's objective to its own, its objective
    (predicted, and measured: the compressed file's bytes, the MACs, or the microseconds), the monitored metric
    after recovery, its drop from the dense model's, the drop it was allowed (see ``AutoCompression``), whether it
    was kept (its drop plus its margin within that drop; for a recovery epoch, better than the kept level), and
    the margin of error its drop was given (``confidence``; 0 without).

    Example:
        >>> Level(1, "pruning", 0, 2.0, 532_000, 498_311, 0.971, 0.002, 0.0025, True, 0.0004).accepted
        True
    """

    level: int
    method: str
    epoch: int
    ratio: float
    predicted_cost: int
    measured_cost: int
    metric: float
    drop: float
    allowed_drop: float
    accepted: bool
    margin: float = 0.0


class AutoCompression(L.Callback):
    """Compress a trained model as far as ``max_accuracy_drop`` allows, choosing the plan of every layer itself.

    At the start of fit the dense model's ``monitor`` is measured on the whole validation set (Lightning's
    sanity check, made full) and a frozen copy is kept: the reference of the budget and the teacher of
    recovery. The methods go one after the other, as Deep Compression's pipeline does: pruning first (what
    retraining recovers from), then shared values (what it hardly recovers from). Each level of a method starts from
    the last accepted one: every targeted layer's next settings (higher sparsities, from 50% to 99%, every output
    unit keeping a weight; or fewer shared values, 256 down to 4: 8 to 2 bits) are measured alone on
    ``calibration_batches`` training batches, the KL divergence of the model's predictions from its own before, and
    the layer's bytes in the compressed format. The level's plan is the least predicted damage (the sum of its
    layers') within its byte budget, solved exactly as a multiple-choice knapsack (SciPy's ``milp``). It is applied
    at the start of an epoch (pruned by magnitude, then clustered) and the model recovers for ``recovery_epochs``
    with the dense teacher's soft targets added to its own loss (``kd_weight``, ``temperature``). Its validation
    metric then decides: within the budget, the next level halves the bytes again; out of it, the model, its masks
    and clusters and the optimizers' state go back to the last accepted level, and the next level lies halfway
    (geometrically) between the two (strictly: its bytes are fewer than the accepted level's and more than the
    rejected one's), until they are within 10%; then the next method. In the first round each method but the last
    stops at its share of the budget (pruning at half of it, leaving the rest to shared values, which recovery
    hardly wins back: without that, pruning spends the budget and the validation's noise at its edge rejects even
    8-bit values). After the last method the methods go round again from the model they left, each with the whole
    budget, as long as a round keeps a level, each method's first step in a new round the finest of its last
    (squared with each level kept, up to halving). The epochs left when the search ends recover the kept level with
    the teacher, one at a time, each kept only where it validates better (undone otherwise), so at the end of every
    epoch the model holds the best kept level (and so does the ``last.ckpt`` of a
    ``ModelCheckpoint(save_last=True)``); with no level within the budget, the dense model comes back unchanged. A
    resumed fit continues the search where it stopped: the reference, the measurements, the history, the accepted
    level and the teacher are in the checkpoint.
    Measure the test set once, afterwards.

    With the channel objectives (``onnx_bytes``, ``macs``, ``latency``) the layers are channel groups (a layer's
    output channels with everything that reads them, found by Torch-Pruning's dependency graph), their settings
    fractions of the channels (by L2 norm, 12.5% to 87.5%), their costs what the model with those channels
    removed changes: its exported graph's bytes, its multiply-accumulates or its time in ONNX Runtime. A plan's
    own cost, measured with all its groups at once, keeps the budget (the knapsack is solved again below it until
    it does). The pruned channels are masked during the search and removed at the end of fit. With ``onnx_bytes`` and
    ``latency`` a level of the ``int8`` method then takes every targeted convolution and linear layer to 8-bit
    integers, as ONNX Runtime runs them (int8 weights per output channel, 7 bits for any AVX2 CPU, int8 activations
    calibrated on the calibration batches), where the model so measured costs less; it recovers with fake
    quantization on (QAT), and ``export(..., format="onnx")`` then writes the integer graph. Those layers are
    quantized layers from setup on, computing in float until then, and float again at the end of fit if no such
    level was kept.

    Args:
        objective: what to minimize: ``"compressed_bytes"``, the bytes of ``export(..., format="compressed")``
            (methods ``"pruning"``, ``"clustering"``), or ``"macs"``, the multiply-accumulates of a forward pass
            on the module's ``example_input_array`` (else the first training batch) (method ``"channels"``: whole output channels pruned, removed at the end of fit),
            ``"onnx_bytes"``, the bytes of its ONNX graph (what a runtime loads; methods ``"channels"`` and
            ``"int8"``, each candidate exported), or ``"latency"``, the microseconds of a forward pass of
            ``latency_batch_size`` samples in ONNX Runtime on this machine, one thread (methods ``"channels"`` and
            ``"int8"``; each candidate exported and timed beside the dense model in interleaved rounds).
        max_accuracy_drop: how far ``monitor`` may fall below the dense model's (rise above it for
            ``mode="min"``), in its own units: 0.005 is half a point of an accuracy in [0, 1].
        monitor: a metric the LightningModule logs in validation (``ClassificationModule`` logs ``val/acc``).
        mode: ``"max"`` when higher is better, ``"min"`` when lower is.
        methods: what may be done to a layer (by default all the objective's): ``"pruning"`` (unstructured, by
            magnitude, every output unit keeps a weight), ``"clustering"`` (shared values, k-means),
            ``"channels"`` (fractions of a layer's output channels, by L2 norm, with all they touch) or ``"int8"``
            (every targeted layer in 8-bit integers, see above).
        confidence: keep a level only where its drop is within the budget at this one-sided confidence, for an
            accuracy ``monitor`` of a classifier: its drop plus that many standard errors, each at most
            ``sqrt(d) / n`` for the ``d`` of the ``n`` validation samples whose predicted class differs from the
            dense model's (see ``auto.margin``); ``None``: the drop itself (the validation set's noise then lets
            a level at the budget's edge lose more on other data).
        teacher: distil from the dense model during recovery.
        recovery_epochs: epochs each level trains before its validation decides.
        calibration_batches: training batches the candidate settings are measured on.
        temperature, kd_weight: the soft targets' temperature and weight (see ``kd_loss``).
        targets, exclude: module types and module-name patterns of the layers to compress (see ``select_layers``).
        seed: the random state of k-means.
        latency_batch_size: the batch the ``latency`` objective is timed at (the traced input repeated to it).

    Example:
        >>> import lightning as L
        >>> auto = AutoCompression(objective="compressed_bytes", max_accuracy_drop=0.005, monitor="val/acc")
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=16, logger=False, callbacks=[auto])
        >>> # trainer.fit(trained_module, datamodule); then auto.plan and auto.history
    """

    def __init__(
        self,
        objective: str = "compressed_bytes",
        max_accuracy_drop: float = 0.005,
        monitor: str = "val/acc",
        mode: str = "max",
        methods: Sequence[str] | None = None,
        confidence: float | None = None,
        teacher: bool = True,
        recovery_epochs: int = 2,
        calibration_batches: int = 8,
        temperature: float = 4.0,
        kd_weight: float = 1.0,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        seed: int = 0,
        latency_batch_size: int = 256,
    ) -> None:
        check_argument("objective", objective, objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}")
        check_argument(
            "max_accuracy_drop",
            max_accuracy_drop,
            is_number(max_accuracy_drop) and 0.0 < max_accuracy_drop < 1.0,
            "a number in (0, 1): the most the monitored metric may lose, 0.005 for half a point of accuracy",
        )
        check_argument("monitor", monitor, isinstance(monitor, str) and bool(monitor), "the name of a logged metric")
        check_argument("mode", mode, mode in MODES, f"one of {', '.join(MODES)}")
        allowed = OBJECTIVE_METHODS[objective]
        methods = allowed if methods is None else methods
        unknown = [method for method in methods if method not in allowed] if not isinstance(methods, str) else [methods]
        check_argument(
            "methods",
            methods,
            bool(methods) and not unknown,
            f"a non-empty list of {', '.join(allowed)} for {objective}",
        )
        check_argument(
            "confidence",
            confidence,
            confidence is None or (is_number(confidence) and 0.5 <= confidence < 1.0),
            "None or a number in [0.5, 1): the one-sided confidence that a kept level's drop is within the budget",
        )
        check_argument("teacher", teacher, isinstance(teacher, bool), "True or False")
        check_argument(
            "recovery_epochs", recovery_epochs, is_int(recovery_epochs) and recovery_epochs >= 1, "an int >= 1"
        )
        check_argument(
            "calibration_batches",
            calibration_batches,
            is_int(calibration_batches) and calibration_batches >= 1,
            "an int >= 1",
        )
        check_argument("temperature", temperature, is_number(temperature) and temperature > 0, "a number > 0")
        check_argument("kd_weight", kd_weight, is_number(kd_weight) and kd_weight >= 0, "a number >= 0")
        check_argument("seed", seed, is_int(seed) and 0 <= seed < 2**32, "an int in [0, 2**32)")
        check_argument(
            "latency_batch_size",
            latency_batch_size,
            is_int(latency_batch_size) and latency_batch_size >= 1,
            "an int >= 1",
        )
        self.objective = objective
        self.max_accuracy_drop = float(max_accuracy_drop)
        self.monitor = monitor
        self.mode = mode
        self.methods = tuple(method for method in allowed if method in methods)  # e.g. pruning first, then clustering
        self.confidence = None if confidence is None else float(confidence)
        self.teacher = teacher
        self.recovery_epochs = int(recovery_epochs)
        self.calibration_batches = int(calibration_batches)
        self.temperature = float(temperature)
        self.kd_weight = float(kd_weight)
        self.targets = targets
        self.exclude = exclude
        self.seed = int(seed)
        self.latency_batch_size = int(latency_batch_size)
        #: The dense model's ``monitor`` on the whole validation set, measured before training.
        self.reference: float | None = None
        #: Every layer's next settings of the current method, measured alone from the accepted level, by layer
        #: name (the accepted setting first); empty until measured.
        self.options: dict[str, list[Candidate]] = {}
        #: Each level tried, in order.
        self.history: list[Level] = []
        #: Whether the search has ended (the model holds the best accepted level).
        self.done = False
        #: The wall time, in seconds, of measuring every layer's settings (the search's cost besides its epochs).
        self.measure_seconds = 0.0
        self._objective: Objective | None = None
        self._batches: list[ModelInputs] = []
        self._stage = 0  # the method whose levels are being tried: an index into methods
        self._round = 0  # how many rounds of the methods have ended
        self._round_start = 0  # the first level of this round of the methods: an index into history
        self._steps: dict[str, float] = {}  # by method, the factor its next level's bytes shrink by (GROWTH if none)
        self._dense = 0  # the dense model's objective
        self._fixed = 0  # the objective's part that the candidates' costs add to (see objectives)
        self._accepted: dict[str, Candidate] = {}
        self._predicted: dict[str, int] = {}  # by layer, its part of the objective predicted for its kept setting
        self._rejected_ratio: float | None = None
        #: The level in training: its first epoch, its method (or RECOVERY) and its plan.
        self._phase: tuple[int, str, dict[str, Candidate]] | None = None
        self._snapshot: dict[str, Any] = {}
        self._teacher_state: dict[str, torch.Tensor] | None = None
        self._reference_classes: torch.Tensor | None = None  # the dense model's on validation (confidence)
        self._handles: list[Any] = []

    # --- what the user reads -------------------------------------------------------------------------

    @property
    def plan(self) -> dict[str, LayerPlan]:
        """The kept plan, by layer name: each layer's setting, its part of the objective predicted when the setting
        was chosen and as it is in the model, and the damage predicted for the setting."""
        return {
            layer: LayerPlan(
                candidate.setting.sparsity,
                candidate.setting.channels,
                candidate.setting.bits,
                self._predicted[layer],
                self._objective.layer_cost(layer),
                candidate.damage,
            )
            for layer, candidate in self._accepted.items()
        }

    @property
    def accepted_ratio(self) -> float:
        """The predicted ratio of the dense model's objective to the accepted level's (1.0 before any level)."""
        return next((level.ratio for level in reversed(self.history) if level.accepted), 1.0)

    # --- setup: what can be compressed, and whether this fit can search ------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ValueError(f"AutoCompression runs in one process; this Trainer has {trainer.world_size}")
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AutoCompression adds the teacher's loss to automatic optimization; this module optimizes manually"
            )
        if trainer.check_val_every_n_epoch != 1 or trainer.val_check_interval != 1.0:
            raise ValueError(
                "AutoCompression decides on each level by its validation metric at the end of an epoch: validate once "
                f"every epoch (check_val_every_n_epoch=1, val_check_interval=1.0), got check_val_every_n_epoch="
                f"{trainer.check_val_every_n_epoch}, val_check_interval={trainer.val_check_interval}"
            )
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < self.recovery_epochs:
            raise ValueError(
                f"AutoCompression needs max_epochs >= recovery_epochs={self.recovery_epochs} (one level's recovery), got "
                f"max_epochs={max_epochs}"
            )
        layers = select_layers(pl_module, self.targets, self.exclude)
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            example = first_training_input(trainer)
        if example is None and self.objective != "compressed_bytes":
            raise ValueError(
                f"AutoCompression(objective={self.objective!r}) traces the model on one input: set "
                f"`example_input_array` on {type(pl_module).__name__}, or fit it with one training dataloader, whose "
                "first batch is then traced"
            )
        self._objective = objective_for(
            self.objective,
            pl_module,
            layers,
            example,
            seed=self.seed,
            latency_batch_size=self.latency_batch_size,
            int8=INT8_METHOD in self.methods,
        )
        trainer.num_sanity_val_steps = math.inf  # the reference: the dense model on the whole validation set

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reference is None:
            self.reference = self._metric(trainer)
            rank_zero_info(f"AutoCompression: the dense model's {self.monitor} is {self.reference:.6g}")

    def _metric(self, trainer: L.Trainer) -> float:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            raise ValueError(
                f"AutoCompression monitors {self.monitor!r}, which validation does not log; it logs {logged}"
            )
        return float(value)

    # --- the start: teacher, calibration batches, hooks ----------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reference is None:
            raise ValueError(
                "AutoCompression measures the dense model on validation data before training: fit with a validation "
                "dataloader (a datamodule's val_dataloader, or val_dataloaders=)"
            )
        first = next(pl_module.parameters())
        inputs = training_inputs(trainer, self.calibration_batches)
        if not inputs:
            raise ValueError(
                "AutoCompression measures each layer's settings on training batches: fit with one training dataloader"
            )
        self._batches = [placed_like(batch, first.device, first.dtype) for batch in inputs]
        if not self._snapshot:  # a new search: the model is dense
            state = pl_module.state_dict()
            self._teacher_state = {name: value.detach().clone() for name, value in state.items()}
            self._accepted = {name: Candidate(name, LayerSetting(), 0.0, 0) for name in self._objective.layers}
            self._predicted = {name: self._objective.layer_cost(name) for name in self._objective.layers}
            self._snapshot = self._take_snapshot(trainer, pl_module)
        dense = model_copy(pl_module)
        dense.load_state_dict(self._teacher_state)
        if self.confidence is not None and self._reference_classes is None:
            self._reference_classes = validation_classes(trainer, dense)
        if self.teacher:
            self._handles.append(TeacherGradient(dense, self.temperature, self.kd_weight).attach(pl_module))
        self._handles += [
            optimizer.register_step_post_hook(lambda *_: self._objective.keep()) for optimizer in trainer.optimizers
        ]

    # --- levels --------------------------------------------------------------------------------------

    def _ratio(self, plan: dict[str, Candidate]) -> float:
        return self._dense / self._objective.predicted(plan)

    def _next_plan(self, pl_module: L.LightningModule) -> dict[str, Candidate] | None:
        """The next level's plan: of the current method, or once its levels are done, of the next one; ``None``
        when the search is over. Measures the current method's settings on the model where they are missing."""
        while True:
            if self.methods[self._stage] == INT8_METHOD:
                plan = self._int8_plan()
            else:
                if not self.options:
                    self._measure(pl_module)
                plan = self._plan_within_method()
            if plan is not None:
                return plan
            if self._rejected_ratio is not None:  # the method's next round starts with its finest step
                self._steps[self.methods[self._stage]] = self._rejected_ratio / self.accepted_ratio
            self._stage, self._rejected_ratio, self.options = self._stage + 1, None, {}
            if self._stage == len(self.methods):  # a round of every method: another, from here, if it kept a level
                if not any(level.accepted for level in self.history[self._round_start :]):
                    return None
                self._stage, self._round, self._round_start = 0, self._round + 1, len(self.history)

    def _measure(self, pl_module: L.LightningModule) -> None:
        """Every layer's next settings of the current method, from where the model stands."""
        start = time.perf_counter()
        method = self.methods[self._stage]
        settings = {
            name: self._objective.settings(method, self._accepted[name].setting, name) for name in self._accepted
        }
        self.options, self._fixed = self._objective.measure(pl_module, settings, self._batches)
        # the accepted level costs what it measures now (the same bytes; MACs relative to where the model stands)
        self._accepted = {name: replace(c, cost=self.options[name][0].cost) for name, c in self._accepted.items()}
        self._dense = self._dense or self._objective.predicted(self._accepted)
        self.measure_seconds += time.perf_counter() - start

    def _int8_plan(self) -> dict[str, Candidate] | None:
        """Every layer in 8 bits, its channels as they are: once a round where it pays, unless the model already is."""
        tried = any(level.method == INT8_METHOD for level in self.history[self._round_start :])
        if tried or any(candidate.setting.bits == 8 for candidate in self._accepted.values()):
            return None
        self._dense = self._dense or self._objective.predicted(self._accepted)
        plan = {layer: replace(c, setting=replace(c.setting, bits=8)) for layer, c in self._accepted.items()}
        return plan if self._ratio(plan) > self.accepted_ratio else None

    def _plan_within_method(self) -> dict[str, Candidate] | None:
        """The least predicted damage at the next byte budget of the current method, or ``None`` past its last."""
        here = {layer: candidates[0] for layer, candidates in self.options.items()}
        low, high, most = self._ratio(here), self._rejected_ratio, self._ratio(cheapest_plan(self.options))
        if high is None:
            if most <= low * (1 + 1e-9):
                return None
            target = min(low * self._steps.get(self.methods[self._stage], GROWTH), most)
        elif high / low <= RESOLUTION:
            return None
        else:
            target = math.sqrt(low * high)
        return self._plan_within(self._dense / target, None if high is None else self._dense / high)

    def _plan_within(self, most_cost: float, rejected_cost: float | None) -> dict[str, Candidate] | None:
        """The least predicted damage whose predicted cost is at most ``most_cost`` (and, after a rejection, more
        than ``rejected_cost``). The candidates' costs add up to a first-order prediction (exact for bytes); where
        a plan's own prediction is over, the budget becomes its summed cost less the excess and the knapsack is
        solved again."""
        fewest = -math.inf if rejected_cost is None else round(rejected_cost) - self._fixed + 1
        budget = most_cost - self._fixed
        for _ in range(ALLOCATION_ROUNDS):
            plan = least_damage_plan(self.options, budget, fewest)
            if plan is None:
                return None
            predicted = self._objective.predicted(plan)
            if predicted <= most_cost:
                return plan if rejected_cost is None or predicted > rejected_cost else None
            budget = plan_cost(plan) - (predicted - most_cost)  # below this plan's own summed cost: another plan
        return None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._phase is not None:
            return
        if self.done:  # the kept level trains on, one epoch at a time, kept only where it validates better
            self._phase = (trainer.current_epoch, RECOVERY, self._accepted)
            return
        if trainer.max_epochs - trainer.current_epoch < self.recovery_epochs:
            trainer.should_stop = True  # resumed with no room for another level
            return
        plan = self._next_plan(pl_module)
        if plan is None:  # nothing to try from a resumed checkpoint
            self._finish_search(trainer)
            return
        changed = {
            layer: candidate.setting
            for layer, candidate in plan.items()
            if candidate.setting != self._accepted[layer].setting
        }
        self._objective.apply(changed, self._batches)
        self._phase = (trainer.current_epoch, self.methods[self._stage], plan)
        rank_zero_info(
            f"AutoCompression level {len(self.history) + 1} ({self.methods[self._stage]}): {self._ratio(plan):.1f}x "
            f"less {self.objective} (predicted), "
            + ", ".join(
                f"{layer} {_described(c.setting, self.objective != 'compressed_bytes')}" for layer, c in plan.items()
            )
        )

    def _allowed_drop(self) -> float:
        """The drop the current method's levels may reach: in the first round, the share of the budget of the methods
        up to the current one (the last method's share is the whole budget); the whole budget in later rounds and
        after the search."""
        if self._round > 0 or self.done:
            return self.max_accuracy_drop
        return self.max_accuracy_drop * (self._stage + 1) / len(self.methods)

    def _finish_search(self, trainer: L.Trainer) -> None:
        """The search is over: the kept level recovers in the epochs left, or with none kept the fit stops."""
        self.done = True
        if not any(level.accepted for level in self.history):
            trainer.should_stop = True

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._objective.share_gradients()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._phase is None:
            return
        first_epoch, method, plan = self._phase
        if trainer.current_epoch < first_epoch + (1 if method == RECOVERY else self.recovery_epochs) - 1:
            return
        metric = self._metric(trainer)
        drop = self.reference - metric if self.mode == "max" else metric - self.reference
        allowed = self._allowed_drop()
        margin = 0.0
        if method == RECOVERY:
            kept = next(level.metric for level in reversed(self.history) if level.accepted)
            accepted = metric > kept if self.mode == "max" else metric < kept
        else:
            if self.confidence is not None:
                errors = standard_errors(self.confidence)
                margin = drop_margin(self._reference_classes, validation_classes(trainer, pl_module), errors)
            accepted = drop + margin <= allowed + 1e-12
        measured = self._objective.total(pl_module)
        self.history.append(
            Level(
                len(self.history) + 1,
                method,
                first_epoch,
                self._ratio(plan),
                self._objective.predicted(plan),
                measured,
                metric,
                drop,
                allowed,
                accepted,
                margin,
            )
        )
        self._phase = None
        if accepted:
            if method != RECOVERY:  # a layer the level left as it was keeps the candidate it was chosen as
                self._steps[method] = min(GROWTH, self._steps.get(method, GROWTH) ** 2)
                changed = {layer for layer, chosen in plan.items() if chosen.setting != self._accepted[layer].setting}
                self._predicted |= {layer: self._objective.layer_prediction(plan[layer]) for layer in changed}
                self._accepted = {
                    layer: chosen if layer in changed else self._accepted[layer] for layer, chosen in plan.items()
                }
                self.options = {}  # the next level is measured from here
            self._snapshot = self._take_snapshot(trainer, pl_module)
        else:
            if method != RECOVERY:
                self._rejected_ratio = self._ratio(plan)
            self._restore(trainer, pl_module)
        rank_zero_info(
            f"AutoCompression level {len(self.history)} ({method}): {self.monitor} {metric:.6g}, drop {drop:.6g}, "
            f"{'kept' if accepted else 'undone'}, {measured:,} {UNITS[self.objective]}"
        )
        if not self.done and self._next_plan(pl_module) is None:
            self._finish_search(trainer)
        needed = 1 if self.done else self.recovery_epochs
        if trainer.max_epochs - (trainer.current_epoch + 1) < needed:
            trainer.should_stop = True  # no room for the next level; a fit resumed with more epochs goes on

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._phase is not None:  # the fit stopped inside a level (max_epochs, or stopped from outside)
            self._restore(trainer, pl_module)
            self._phase = None
        self._objective.finish()  # the kept level as the objective counts it (channels removed)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- the accepted level: kept, and gone back to ----------------------------------------------------

    def _take_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {
            "model": {name: value.detach().clone() for name, value in pl_module.state_dict().items()},
            "weights": self._objective.state_dict(),
            "optimizers": [copy.deepcopy(optimizer.state_dict()) for optimizer in trainer.optimizers],
        }

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.load_state_dict(self._snapshot["model"])
        self._objective.load_state_dict(self._snapshot["weights"])
        for optimizer, state in zip(trainer.optimizers, self._snapshot["optimizers"]):
            optimizer.load_state_dict(state)

    # --- checkpoint state: plain tensors, numbers and strings ------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(objective=self.objective, monitor=self.monitor, targets=str(self.targets))

    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "measure_seconds": self.measure_seconds,
            "options": [_candidate_row(c) for candidates in self.options.values() for c in candidates],
            "dense": self._dense,
            "fixed": self._fixed,
            "history": [asdict(level) for level in self.history],
            "done": self.done,
            "stage": self._stage,
            "round": self._round,
            "round_start": self._round_start,
            "steps": self._steps,
            "accepted": [_candidate_row(c) for c in self._accepted.values()],
            "predicted": self._predicted,
            "rejected_ratio": self._rejected_ratio,
            "phase": None
            if self._phase is None
            else [self._phase[0], self._phase[1], [_candidate_row(c) for c in self._phase[2].values()]],
            "weights": self._objective.state_dict(),
            "snapshot": self._snapshot,
            "teacher": self._teacher_state,
            "reference_classes": self._reference_classes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict["reference"]
        self.measure_seconds = state_dict["measure_seconds"]
        self.options = {}
        for row in state_dict["options"]:
            self.options.setdefault(row[0], []).append(_candidate(row))
        self._dense, self._fixed = state_dict["dense"], state_dict["fixed"]
        self.history = [Level(**level) for level in state_dict["history"]]
        self.done = state_dict["done"]
        self._stage, self._round = state_dict["stage"], state_dict["round"]
        self._round_start = state_dict["round_start"]
        self._steps = dict(state_dict["steps"])
        self._accepted = {row[0]: _candidate(row) for row in state_dict["accepted"]}
        self._predicted = dict(state_dict["predicted"])
        self._rejected_ratio = state_dict["rejected_ratio"]
        phase = state_dict["phase"]
        self._phase = None if phase is None else (phase[0], phase[1], {row[0]: _candidate(row) for row in phase[2]})
        self._objective.load_state_dict(state_dict["weights"])
        self._snapshot = state_dict["snapshot"]
        self._teacher_state = state_dict["teacher"]
        self._reference_classes = state_dict.get("reference_classes")


def _candidate_row(candidate: Candidate) -> list[Any]:
    setting = candidate.setting
    return [candidate.layer, setting.sparsity, setting.bits, setting.channels, candidate.damage, candidate.cost]


def _candidate(row: list[Any]) -> Candidate:
    layer, sparsity, bits, channels, damage, cost = row
    return Candidate(layer, LayerSetting(sparsity, bits, channels), damage, cost)


def _described(setting: LayerSetting, channels: bool) -> str:
    if channels:
        return f"{setting.channels:.1%} of its channels pruned" + (", int8" if setting.bits == 8 else "")
    bits = "float" if setting.bits is None else f"{setting.bits}-bit shared values"
    return f"{setting.sparsity:.0%} pruned, {bits}"
