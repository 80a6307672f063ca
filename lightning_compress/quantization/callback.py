"""The quantization callbacks: ``QuantizationAwareTraining`` (fake quantization while training) and
``PostTrainingQuantization`` (calibration of a trained model)."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.quantization.calibration import calibrate, finish_calibration, start_calibration
from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.fake_quant import FakeQuantizer
from lightning_compress.quantization.layers import (
    quantize_model,
    quantizers,
    set_quantization,
)
from lightning_compress.targets import TargetSpec

#: The fields of :class:`QuantConfig`, which the callbacks also take as keyword arguments.
QUANT_SETTINGS = tuple(field.name for field in dataclasses.fields(QuantConfig))


def quant_config(
    config: QuantConfig | None,
    settings: dict[str, Any],
    defaults: dict[str, Any],
    allowed: tuple[str, ...] = QUANT_SETTINGS,
) -> QuantConfig:
    """``config``, or a :class:`QuantConfig` of ``settings`` over ``defaults``: one or the other, never both.

    Example:
        >>> quant_config(None, {"weight_bits": 4}, {"observer": "minmax"})
        QuantConfig(weight_bits=4, activation_bits=8, bias_bits=32, per_channel=True, group_size=None, symmetric=True, activation_symmetric=None, reduce_range=None, target_cpu='avx2', observer='minmax', learnable_scales=False, averaging_constant=0.01, n_std=3.0, percentile=99.99)
    """
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown quantizer setting(s) {unknown}; the settings are {', '.join(allowed)} (or config=QuantConfig(...))"
        )
    if config is None:
        return QuantConfig(**{**defaults, **settings})
    if settings:
        raise ValueError(
            f"give the quantizer settings as config=QuantConfig(...) or as keyword arguments, not both: got config and {sorted(settings)}"
        )
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    return config


@torch.no_grad()
def share_ranges(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Give every process rank zero's quantizer state (observed ranges, scales, zero points).

    DDP hands every rank rank zero's buffers before each training forward, but each rank's own
    observers then move with its own batch; after an epoch or a calibration this makes the ranges
    identical everywhere, as the checkpoint (rank zero's) has them.
    """
    if trainer.world_size == 1:
        return
    state = _quantizer_state(pl_module)
    shared = trainer.strategy.broadcast({name: tensor.detach().cpu() for name, tensor in state.items()}, src=0)
    for name, tensor in state.items():
        tensor.copy_(shared[name])


class _QuantizingCallback(L.Callback):
    """Quantizes the targeted layers at setup, before the optimizers are built."""

    def __init__(self, config: QuantConfig, targets: TargetSpec, exclude: TargetSpec) -> None:
        self.config = config
        self.targets = targets
        self.exclude = exclude

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        quantize_model(pl_module, self.config, self.targets, self.exclude, warn=rank_zero_warn)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=self.config, targets=str(self.targets))


class QuantizationAwareTraining(_QuantizingCallback):
    """Train with fake-quantized weights and activations so the model learns to live on the integer grid.

    At setup, before the optimizers are built, the targeted ``Conv1d/2d/3d`` and ``Linear`` layers become
    quantized layers (same parameters, plus an input and a weight quantizer), so learned scales are
    optimized and every checkpoint holds the quantizers' state. At the start of each epoch the switches
    follow the epoch: observers watch ranges from the start; fake quantization is on from
    ``start_epoch``; observers freeze at ``freeze_observers_epoch``; BatchNorm layers stop updating
    their statistics (eval mode) from ``freeze_bn_epoch``. The switches are module buffers, so a
    resumed run, ``test(ckpt_path=...)`` and a checkpoint loaded into a fresh module quantize the same.
    Under mixed precision and in a bfloat16 model (``precision="bf16-true"``) the quantizers keep their state
    in float32 and round in float32 (see :class:`~lightning_compress.quantization.FakeQuantizer`).

    Args:
        config: the quantizer settings, a :class:`QuantConfig`; or its fields as keyword arguments
            (``weight_bits=4``, ``reduce_range=True``, ``learnable_scales=True`` for LSQ, ...), not both.
        start_epoch, freeze_observers_epoch, freeze_bn_epoch: epoch boundaries, see above.
        targets, exclude: module types and name patterns (see ``select_layers``).

    Example:
        >>> import lightning as L
        >>> qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=1, freeze_bn_epoch=2)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, callbacks=[qat])
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        *,
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        **settings: Any,
    ) -> None:
        config = quant_config(config, settings, defaults={})
        super().__init__(config, targets, exclude)
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if freeze_observers_epoch is not None and freeze_observers_epoch < start_epoch:
            raise ValueError(
                f"freeze_observers_epoch ({freeze_observers_epoch}) must not be before start_epoch ({start_epoch}): "
                "the ranges would freeze before fake quantization ever used them"
            )
        if freeze_bn_epoch is not None and freeze_bn_epoch < 0:
            raise ValueError(f"freeze_bn_epoch must be >= 0 or None, got {freeze_bn_epoch}")
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if (
            stage == "fit"
            and not trainer.fast_dev_run
            and trainer.max_epochs is not None
            and 0 <= trainer.max_epochs <= self.start_epoch
        ):
            rank_zero_warn(
                f"QuantizationAwareTraining(start_epoch={self.start_epoch}) never switches fake quantization on within "
                f"max_epochs={trainer.max_epochs}: the model stays float unless training is resumed further"
            )

    def final_epoch(self) -> int:
        """The epoch of the last switch (fake quantization on, observers or BatchNorm frozen): from its end on,
        the model quantizes as it will be exported."""
        return max(
            epoch
            for epoch in (self.start_epoch, self.freeze_observers_epoch, self.freeze_bn_epoch)
            if epoch is not None
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        observing = self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch
        set_quantization(pl_module, enabled=epoch >= self.start_epoch, observing=observing)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        share_ranges(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The ranges are final once training ends (fake quantization stays as the last epoch had it)."""
        set_quantization(pl_module, observing=False)
        share_ranges(trainer, pl_module)


class PostTrainingQuantization(_QuantizingCallback):
    """Quantize a trained model by calibration: observe activation ranges on a few batches, no training.

    Three ways to use it, all with the same quantizer settings:

    - ``trainer.validate(model, calibration_loader)`` with the callback: the first
      ``calibration_batches`` batches calibrate (the pass itself reports the float model), and the
      model is quantized from then on (``trainer.test`` measures it).
    - In ``trainer.fit``: the model trains in float and is calibrated on ``calibration_batches`` of its
      training batches when training ends (the report and ``trainer.test`` then see it quantized).
    - Without a trainer: ``PostTrainingQuantization(...).quantize(model, dataloader)``.

    The activation clipping choices of Intel Distiller's ``PostTrainLinearQuantizer``: ``observer="minmax"``
    (no clipping), ``"moving_average"`` (the mean of each batch's min and max; an exponential average
    with ``averaging_constant``), ``"mean_std"`` (mean ± ``n_std`` standard deviations) or
    ``"percentile"``; symmetric or asymmetric; per-channel or per-tensor weights; separate bits for
    weights, activations and the bias accumulator. The settings are a :class:`QuantConfig` given as
    ``config=`` or its fields as keyword arguments (``learnable_scales`` aside; the default observer is
    ``"minmax"``, averaged with the plain mean over batches), and ``calibration_batches`` (``None``: every batch).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> ptq = PostTrainingQuantization(weight_bits=8, activation_bits=8, observer="percentile", calibration_batches=4)
        >>> ptq.quantize(model, [torch.randn(16, 4) for _ in range(10)])
        4
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        *,
        calibration_batches: int | None = 32,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        **settings: Any,
    ) -> None:
        # min-max over the plain mean of what calibration sees; learned step sizes need training
        allowed = tuple(name for name in QUANT_SETTINGS if name != "learnable_scales")
        config = quant_config(
            config, settings, defaults={"observer": "minmax", "averaging_constant": None}, allowed=allowed
        )
        super().__init__(config, targets, exclude)
        if calibration_batches is not None and calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1 or None (every batch), got {calibration_batches}")
        self.calibration_batches = calibration_batches
        self._calibrating = False

    def quantize(self, model: nn.Module, batches: Any) -> int:
        """Quantize ``model`` in place and calibrate it on ``batches``; returns the number of batches used."""
        quantize_model(model, self.config, self.targets, self.exclude)
        return calibrate(model, batches, self.calibration_batches)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        calibrate(pl_module, trainer.train_dataloader, self.calibration_batches)
        share_ranges(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._calibrating = trainer.state.fn == "validate"
        if self._calibrating:
            start_calibration(pl_module)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._calibrating:
            return
        observing = self.calibration_batches is None or batch_idx < self.calibration_batches
        for quantizer in quantizers(pl_module):
            quantizer.train(observing)  # the model is in eval mode; its quantizers alone observe

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._calibrating:
            finish_calibration(pl_module)
            for quantizer in quantizers(pl_module):
                quantizer.eval()
            share_ranges(trainer, pl_module)
            self._calibrating = False


def _quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every fake quantizer in ``model``, by name."""
    return {
        f"{name}.{tensor_name}": tensor
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantizer)
        for tensor_name, tensor in [*module.named_parameters(), *module.named_buffers()]
    }
