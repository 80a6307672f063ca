"""The ``QuantizationAwareTraining`` callback: fake quantization switched on, observers and BatchNorm frozen, at epoch boundaries."""

from __future__ import annotations

import lightning as L
from torch import nn

from lightning_compress.quantization.config import QuantConfig
from lightning_compress.quantization.layers import quantize_model, set_quantization
from lightning_compress.targets import TargetSpec


class QuantizationAwareTraining(L.Callback):
    """Train with fake-quantized weights and activations so the model learns to live on the integer grid.

    At setup, before the optimizers are built, the targeted ``Conv1d/2d/3d`` and ``Linear`` layers become
    quantized layers (same parameters, plus an input and a weight quantizer), so learned scales are
    optimized and every checkpoint holds the quantizers' state. At the start of each epoch the switches
    follow the epoch: observers watch ranges from the start; fake quantization is on from
    ``start_epoch``; observers freeze at ``freeze_observers_epoch``; BatchNorm layers stop updating
    their statistics (eval mode) from ``freeze_bn_epoch``. The switches are module buffers, so a
    resumed run, ``test(ckpt_path=...)`` and a checkpoint loaded into a fresh module quantize the same.

    Args:
        weight_bits, activation_bits: 2 to 8.
        per_channel: one weight scale per output channel (else one per tensor).
        symmetric: signed ranges with zero point 0 (else unsigned ranges with a zero point).
        observer: activation range estimate: ``"minmax"``, ``"moving_average"``, ``"mean_std"``, ``"percentile"``.
        learnable_scales: learn the step sizes (LSQ) once fake quantization starts.
        start_epoch, freeze_observers_epoch, freeze_bn_epoch: epoch boundaries, see above.
        targets, exclude: module types and name patterns (see ``select_layers``).
        averaging_constant, n_std, percentile: settings of the moving-average, mean ± n std and percentile observers.

    Example:
        >>> import lightning as L
        >>> qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=1, freeze_bn_epoch=2)
        >>> trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, callbacks=[qat])
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_channel: bool = True,
        symmetric: bool = True,
        observer: str = "moving_average",
        learnable_scales: bool = False,
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        averaging_constant: float = 0.01,
        n_std: float = 3.0,
        percentile: float = 99.99,
    ) -> None:
        self.config = QuantConfig(
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            per_channel=per_channel,
            symmetric=symmetric,
            observer=observer,
            learnable_scales=learnable_scales,
            averaging_constant=averaging_constant,
            n_std=n_std,
            percentile=percentile,
        )
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
        self.targets = targets
        self.exclude = exclude

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        quantize_model(pl_module, self.config, self.targets, self.exclude)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        observing = self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch
        set_quantization(pl_module, enabled=epoch >= self.start_epoch, observing=observing)
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The ranges are final once training ends (fake quantization stays as the last epoch had it)."""
        set_quantization(pl_module, observing=False)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(config=self.config, targets=str(self.targets))
