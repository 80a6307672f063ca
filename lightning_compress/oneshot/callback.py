"""The one-shot callbacks: ``OneShotPruning`` (Wanda, SparseGPT or magnitude pruning from a few calibration
batches, in ``trainer.validate`` or a fit, the pruned weights kept at zero while the fit trains on) and
``OneShotQuantization`` (GPTQ or round-to-nearest weights, in ``trainer.validate`` or at the end of a fit)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_compress.arguments import check_argument, config_or_arguments, is_int
from lightning_compress.oneshot.hessian import BLOCK_SIZE, DAMPING
from lightning_compress.oneshot.pruning import OneShotPruningConfig, linear_pruner, one_shot_prune
from lightning_compress.oneshot.quantization import OneShotQuantizationConfig, one_shot_quantize, quantize_targets
from lightning_compress.oneshot.reconstruction import RECONSTRUCTION_DAMPING
from lightning_compress.pruning.pruner import Pruner
from lightning_compress.quantization.callback import quant_config, share_ranges
from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.layers import QuantizedLayer
from lightning_compress.targets import TargetSpec

PRUNE_AT = ("start", "end")


def validation_batches(trainer: L.Trainer) -> Iterable[Any]:
    """The (first) validation dataloader of ``trainer``'s current ``validate``."""
    loaders = trainer.val_dataloaders
    return loaders[0] if isinstance(loaders, list | tuple) else loaders


def check_calibration_batches(calibration_batches: int) -> None:
    check_argument(
        "calibration_batches",
        calibration_batches,
        is_int(calibration_batches) and calibration_batches >= 1,
        "an int >= 1 (the batches that calibrate)",
    )


class OneShotPruning(L.Callback):
    """Prune the linear layers once from calibration data: Wanda, SparseGPT (with its weight update) or magnitude.

    Three ways to use it, the same pruning in each:

    - ``trainer.validate(model, calibration_loader)``: the first ``calibration_batches`` batches calibrate
      before the pass, which then measures the pruned model.
    - In ``trainer.fit``: with ``prune_at="start"`` the model is pruned from the first training batches
      before the first step, and the pruned weights stay exactly zero after every optimizer step, so the
      fit is the recovery (a :class:`~lightning_compress.DistillationModule` whose teacher is the dense
      model recovers the most); with ``prune_at="end"`` a dense training is pruned when it ends.
    - Without a trainer: ``OneShotPruning(...).apply(model, dataloader)`` returns the
      :class:`~lightning_compress.pruning.Pruner` holding the masks.

    Checkpoints hold the masks: a resumed fit keeps them and never prunes again. Under DDP every rank
    calibrates on its own batches and takes rank zero's masks and weights.

    Args:
        method: ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"`` (see :class:`OneShotPruningConfig`).
        amount: the sparsity of the targeted weights, in [0, 1); 0.5 unless an N:M ``granularity`` implies it; or a
            dict of layer name -> that layer's sparsity.
        granularity: ``"unstructured"`` or an N:M pattern such as ``"2:4"``.
        calibration_batches: how many batches calibrate (at least 1).
        targets, exclude: module types and name patterns (see ``select_layers``); every ``nn.Linear`` by default.
        damping, block_size: SparseGPT's damping of the Hessian and its block of columns.
        reconstruct, reconstruction_damping: solve each layer's surviving weights exactly for its calibration
            outputs once its mask is chosen, with this ridge towards the weights before pruning.
        prune_at: in a fit, ``"start"`` (then train on with the zeros kept) or ``"end"``.
        progress: show a progress bar over the layers.
        config: the pruning settings as a :class:`OneShotPruningConfig` instead of the arguments (not both).

    Example:
        >>> import lightning as L
        >>> pruning = OneShotPruning(method="wanda", granularity="2:4", calibration_batches=8)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[pruning])
    """

    def __init__(
        self,
        method: str = "sparsegpt",
        amount: float | None = None,
        granularity: str = "unstructured",
        calibration_batches: int = 16,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        damping: float = DAMPING,
        block_size: int = BLOCK_SIZE,
        prune_at: str = "start",
        progress: bool = True,
        *,
        reconstruct: bool = False,
        reconstruction_damping: float = RECONSTRUCTION_DAMPING,
        config: OneShotPruningConfig | None = None,
    ) -> None:
        check_calibration_batches(calibration_batches)
        check_argument("prune_at", prune_at, prune_at in PRUNE_AT, f"one of {', '.join(PRUNE_AT)}")
        self.config = config_or_arguments(
            config,
            OneShotPruningConfig(
                method, amount, granularity, targets, exclude, damping, block_size, reconstruct, reconstruction_damping
            ),
        )
        self.calibration_batches = calibration_batches
        self.prune_at = prune_at
        self.progress = progress
        self.pruner: Pruner | None = None
        self._restored_masks: dict[str, torch.Tensor] | None = None
        self._step_hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks by weight name (``False``: pruned); empty before pruning."""
        return self.pruner.masks if self.pruner is not None else {}

    def apply(self, model: torch.nn.Module, batches: Iterable[Any], **options: Any) -> Pruner:
        """Prune ``model`` in place from the first ``calibration_batches`` of ``batches``; returns its :class:`Pruner`
        (``options``: ``share``, ``warn`` of :func:`~lightning_compress.oneshot.pruning.one_shot_prune`)."""
        self.pruner = one_shot_prune(
            model, batches, self.config, self.calibration_batches, progress=self.progress, **options
        )
        return self.pruner

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        linear_pruner(pl_module, self.config, warn=lambda _: None)  # bad targets fail here, before any work

    def _prune(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: Iterable[Any]) -> None:
        self.apply(
            pl_module,
            batches,
            share=lambda result: trainer.strategy.broadcast(result, src=0),
            warn=rank_zero_warn,
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate" and self.pruner is None:
            self._prune(trainer, pl_module, validation_batches(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored_masks is not None:
            self.pruner = linear_pruner(pl_module, self.config, warn=lambda _: None)
            self.pruner.load_state_dict({"masks": self._restored_masks, "channel_keep": {}})
            self.pruner.apply()
            self._restored_masks = None
        elif self.prune_at == "start" and self.pruner is None:
            self._prune(trainer, pl_module, trainer.train_dataloader)
        if self.pruner is not None:
            self._step_hooks = [self.pruner.attach(optimizer) for optimizer in trainer.optimizers]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks = []
        if self.prune_at == "end" and self.pruner is None:
            self._prune(trainer, pl_module, trainer.train_dataloader)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.config.method, amount=self.config.amount, granularity=self.config.granularity
        )

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_masks = dict(state_dict["masks"]) or None


class OneShotQuantization(L.Callback):
    """Quantize the linear layers' weights once from calibration data, by GPTQ or round-to-nearest, onto the
    project's quantizers (their activation ranges calibrated on the same batches), so the integer export
    writes the result (4-bit weights as ``INT4``).

    Three ways to use it, as :class:`~lightning_compress.PostTrainingQuantization`:
    ``trainer.validate(model, calibration_loader)`` quantizes before the pass, which measures the quantized
    model; in ``trainer.fit`` the model trains in float and is quantized from the first training batches
    when training ends; ``OneShotQuantization(...).apply(model, dataloader)`` without a trainer. In a fit
    the layers become quantized layers at setup (quantization off), so every checkpoint loads into it.

    Args:
        method: ``"gptq"`` or ``"rtn"`` (see :class:`OneShotQuantizationConfig`).
        quantization: the grids, a :class:`~lightning_compress.quantization.QuantConfig` (4-bit symmetric
            weights per output channel, min-max activation ranges by default), or its fields as keyword
            arguments over those defaults (``weight_bits=4, group_size=128``), not both.
        act_order: GPTQ visits the input columns by decreasing energy.
        calibration_batches: how many batches calibrate (at least 1).
        targets, exclude: module types and name patterns; every ``nn.Linear`` by default.
        damping, block_size: GPTQ's damping of the Hessian and its block of columns.
        progress: show a progress bar over the layers.
        config: the settings as a :class:`OneShotQuantizationConfig` instead of the arguments (not both); its
            ``layer_quantization`` gives layers grids of their own (a plan of
            :func:`~lightning_compress.auto.allocate_bits`).

    Example:
        >>> import lightning as L
        >>> gptq = OneShotQuantization(method="gptq", act_order=True, calibration_batches=8)
        >>> OneShotQuantization(weight_bits=4, group_size=128).config.quantization.group_size
        128
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[gptq])
    """

    def __init__(
        self,
        method: str = "gptq",
        quantization: QuantConfig | None = None,
        act_order: bool = False,
        calibration_batches: int = 16,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        damping: float = DAMPING,
        block_size: int = BLOCK_SIZE,
        progress: bool = True,
        *,
        config: OneShotQuantizationConfig | None = None,
        **settings: Any,
    ) -> None:
        check_calibration_batches(calibration_batches)
        if quantization is None or settings:  # else the config checks what it was given, under its own name
            defaults = dataclasses.asdict(OneShotQuantizationConfig().quantization)
            quantization = quant_config(quantization, settings, defaults)
        self.config = config_or_arguments(
            config, OneShotQuantizationConfig(method, quantization, act_order, targets, exclude, damping, block_size)
        )
        self.calibration_batches = calibration_batches
        self.progress = progress
        self.quantized = False

    def apply(self, model: torch.nn.Module, batches: Iterable[Any], **options: Any) -> dict[str, QuantizedLayer]:
        """Quantize ``model`` in place from the first ``calibration_batches`` of ``batches``; returns the quantized
        layers (``options``: ``share``, ``warn`` of :func:`~lightning_compress.oneshot.quantization.one_shot_quantize`)."""
        layers = one_shot_quantize(
            model, batches, self.config, self.calibration_batches, progress=self.progress, **options
        )
        self.quantized = True
        return layers

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        quantize_targets(pl_module, self.config, warn=rank_zero_warn)

    def _quantize(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: Iterable[Any]) -> None:
        self.apply(
            pl_module,
            batches,
            share=lambda weights: trainer.strategy.broadcast(weights, src=0),
            warn=lambda _: None,  # setup warned
        )
        share_ranges(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate" and not self.quantized:
            self._quantize(trainer, pl_module, validation_batches(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.quantized:  # a second fit trains the quantized model on
            self._quantize(trainer, pl_module, trainer.train_dataloader)

    @property
    def state_key(self) -> str:
        quantization = self.config.quantization
        return self._generate_state_key(
            method=self.config.method, bits=quantization.weight_bits, group_size=quantization.group_size
        )
