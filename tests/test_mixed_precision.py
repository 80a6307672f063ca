"""Every callback under mixed precision (bfloat16 and float16 autocast) and in a bfloat16 model, on the CPU.

Lightning turns ``precision="16-mixed"`` into ``"bf16-mixed"`` on the CPU (tested below), so the float16 case runs
Lightning's own ``MixedPrecision`` plugin with float16 autocast and a ``GradScaler`` on the CPU, what
``"16-mixed"`` does on a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import pytest
import torch
from digits import quiet_trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_compress import (
    AutoCompression,
    ClassificationModule,
    CompressionReport,
    DistillationModule,
    OneShotPruning,
    OneShotQuantization,
    PostTrainingQuantization,
    Pruning,
    QuantizationAwareTraining,
    WeightClustering,
)
from lightning_compress.data import DigitsDataModule
from lightning_compress.deploy.onnx import OnnxRuntimeModel
from lightning_compress.models import SmallCNN
from lightning_compress.quantization import FakeQuantizer, QuantConfig, calibrate, quantize_model, quantized_layers

PRECISIONS = {
    "bf16-mixed": {"precision": "bf16-mixed"},
    "16-mixed": {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]},
    "bf16-true": {"precision": "bf16-true"},
}

Fitted = tuple[L.Trainer, L.LightningModule, L.Callback, torch.Tensor]


def small_cnn() -> SmallCNN:
    return SmallCNN(image_size=8, channels=(8, 16), hidden=32)


def fit(
    tmp_path,
    callback: L.Callback | list[L.Callback] | None,
    precision: str,
    make_module: Callable[[], ClassificationModule] = lambda: ClassificationModule(
        small_cnn(), 10, input_shape=(1, 8, 8)
    ),
) -> Fitted:
    """Two epochs of 4 steps (32 digits) under ``precision``; also the training inputs as the model takes them."""
    L.seed_everything(0)
    module = make_module()
    datamodule = DigitsDataModule(batch_size=8, train_samples=32)
    trainer = quiet_trainer(
        tmp_path,
        callback if isinstance(callback, list) else [callback] if callback is not None else [],
        max_epochs=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        **PRECISIONS[precision],
    )
    trainer.fit(module, datamodule=datamodule)
    dtype = next(module.model.parameters()).dtype
    inputs = torch.cat([images for images, _ in trainer.train_dataloader]).to(dtype)
    assert dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    with torch.no_grad():
        assert torch.isfinite(module.eval()(inputs)).all()
    return trainer, module, callback, inputs


def targeted_weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.weight for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def check_on_the_grid(module: L.LightningModule, bits: int) -> None:
    """Each quantized weight rounds, in float32, onto integers of ``bits``, and in its own dtype to the same values."""
    for name, layer in quantized_layers(module).items():
        quantizer, weight = layer.weight_quantizer, layer.weight.detach()
        assert {tensor.dtype for tensor in (quantizer.scale, quantizer.observer.min_val)} == {torch.float32}, name
        rounded = quantizer(weight.float())
        levels = rounded / quantizer.scale.detach().view(-1, *[1] * (weight.dim() - 1))
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4, msg=name)
        assert levels.round().abs().max() <= 2 ** (bits - 1), name
        assert torch.equal(quantizer(weight), rounded.to(weight.dtype)), name


def check_qat(fitted: Fitted) -> None:
    check_on_the_grid(fitted[1], bits=8)


def check_lsq(fitted: Fitted) -> None:
    """The learned step sizes stay float32 and train (the gradient flows back through the casts): each moved from
    where the observer set it, at the first step."""
    check_on_the_grid(fitted[1], bits=4)
    for name, layer in quantized_layers(fitted[1]).items():
        quantizer = layer.weight_quantizer
        observed, _ = quantizer.observer.qparams(*quantizer.quant_range, quantizer.symmetric)
        assert not torch.equal(quantizer.scale.detach(), observed), name


def first_input_observer(module: L.LightningModule) -> nn.Module:
    return module.model.features[0].input_quantizer.observer


def check_ptq_minmax(fitted: Fitted) -> None:
    """Calibrated on every training batch: the first layer's input range is the inputs' (as the model takes them)."""
    _, module, _, inputs = fitted
    observer = first_input_observer(module)
    assert observer.min_val.item() == inputs.min().item() and observer.max_val.item() == inputs.max().item()
    assert all(bool(quantizer.enabled) for quantizer in module.modules() if isinstance(quantizer, FakeQuantizer))


def check_ptq_mean_std(fitted: Fitted) -> None:
    """The running sums stay float64 in a bfloat16 model: they hold the inputs' count and sums exactly."""
    _, module, _, inputs = fitted
    observer = first_input_observer(module)
    values = inputs.double()
    assert observer.count.dtype == observer.total.dtype == torch.float64
    assert observer.count.item() == values.numel()
    torch.testing.assert_close(observer.total, values.sum(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(observer.total_sq, (values**2).sum(), rtol=1e-12, atol=1e-9)


def check_ptq_percentile(fitted: Fitted) -> None:
    _, module, _, inputs = fitted
    observer = first_input_observer(module)
    assert inputs.min().item() <= observer.min_val.item() < observer.max_val.item() <= inputs.max().item()


def check_clustering(fitted: Fitted) -> None:
    for name, weight in targeted_weights(fitted[1]).items():
        assert weight.unique().numel() <= 4, name


def check_pruned(fitted: Fitted) -> None:
    """Exactly half of the targeted weights are zero, and they are the masked ones."""
    pruning = fitted[2]
    weights = dict(fitted[1].named_parameters())
    masks = {name: mask for name, mask in pruning.masks.items() if name.endswith(".weight")}
    total = sum(mask.numel() for mask in masks.values())
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.5 * total)
    for name, mask in masks.items():
        assert not weights[name][~mask].any(), name


def check_channels(fitted: Fitted) -> None:
    pruning = fitted[2]
    kept = sum(int(keep.sum()) for keep in pruning.channel_keep.values())
    channels = sum(keep.numel() for keep in pruning.channel_keep.values())
    assert kept == channels - round(0.5 * channels)
    check_zeros_are_masked(fitted)


def check_zeros_are_masked(fitted: Fitted) -> None:
    weights = dict(fitted[1].named_parameters())
    for name, mask in fitted[2].masks.items():
        assert not weights[name][~mask].any(), name


def check_one_shot_pruning(fitted: Fitted) -> None:
    """Half of every linear layer's weights, exactly."""
    masks = fitted[2].masks
    assert masks and all(int((~mask).sum()) * 2 == mask.numel() for mask in masks.values())
    check_zeros_are_masked(fitted)


def check_one_shot_quantization(fitted: Fitted) -> None:
    check_on_the_grid(fitted[1], bits=4)


def check_report(fitted: Fitted) -> None:
    report = fitted[2].report
    before, after = report.entry("before"), report.entry("after")
    parameters = sum(parameter.numel() for parameter in fitted[1].parameters())
    assert before.profile.parameters == after.profile.parameters == parameters
    assert 0.0 <= after.val_accuracy <= 1.0 and after.profile.macs == before.profile.macs > 0


def check_auto(fitted: Fitted) -> None:
    """Levels were tried, and the model holds the kept plan: its sparsity to the element, its shared values."""
    auto, module = fitted[2], fitted[1]
    assert len(auto.history) == 2 and auto.reference is not None
    for name, layer in auto.plan.items():
        weight = module.get_submodule(name).weight.detach()
        assert int((weight == 0).sum()) == round(layer.sparsity * weight.numel()), name
        assert layer.bits is None or weight[weight != 0].unique().numel() <= 2**layer.bits


CALLBACKS: dict[str, tuple[Callable[[], L.Callback], Callable[[Fitted], None]]] = {
    "auto": (lambda: AutoCompression(max_accuracy_drop=0.5, recovery_epochs=1, calibration_batches=2), check_auto),
    "qat": (lambda: QuantizationAwareTraining(), check_qat),
    "lsq": (lambda: QuantizationAwareTraining(weight_bits=4, learnable_scales=True), check_lsq),
    "ptq": (lambda: PostTrainingQuantization(calibration_batches=None), check_ptq_minmax),
    "ptq_mean_std": (
        lambda: PostTrainingQuantization(calibration_batches=None, observer="mean_std"),
        check_ptq_mean_std,
    ),
    "ptq_percentile": (lambda: PostTrainingQuantization(observer="percentile"), check_ptq_percentile),
    "clustering": (lambda: WeightClustering(clusters=4, start_epoch=1), check_clustering),
    "pruning": (lambda: Pruning(amount=0.5, start_epoch=0, end_epoch=1), check_pruned),
    "taylor": (lambda: Pruning(amount=0.5, criterion="taylor", start_epoch=0, end_epoch=1), check_pruned),
    "channel": (
        lambda: Pruning(amount=0.5, granularity="channel", schedule="oneshot", start_epoch=1),
        check_channels,
    ),
    "oneshot_pruning": (
        lambda: OneShotPruning("sparsegpt", amount=0.5, calibration_batches=2, progress=False),
        check_one_shot_pruning,
    ),
    "oneshot_quantization": (
        lambda: OneShotQuantization(calibration_batches=2, progress=False),
        check_one_shot_quantization,
    ),
    "report": (
        lambda: CompressionReport(
            latency_batch_sizes=(1,), latency_warmup=1, latency_repeats=2, latency_rounds=1, verbose=False
        ),
        check_report,
    ),
}


@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_callback_under_every_precision(tmp_path, precision: str, callback: str) -> None:
    make, check = CALLBACKS[callback]
    check(fit(tmp_path, make(), precision))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_distillation_under_every_precision(tmp_path, precision: str) -> None:
    """The teacher, outside the module tree, keeps its own float32 and takes the student's inputs in it."""
    teacher = small_cnn()
    trainer, module, _, inputs = fit(
        tmp_path, None, precision, lambda: DistillationModule(small_cnn(), teacher, 10, input_shape=(1, 8, 8))
    )
    assert next(teacher.parameters()).dtype == torch.float32
    assert torch.isfinite(trainer.callback_metrics["train/distill"]) and trainer.callback_metrics["train/distill"] > 0
    with torch.no_grad():
        assert torch.equal(module.teacher_output(inputs), teacher.eval()(inputs.float()))


def test_a_bfloat16_model_runs_in_onnx_runtime_in_float32_with_its_integers(tmp_path) -> None:
    """ONNX Runtime's CPU kernels have no bfloat16 convolution: the export (and the report's ONNX Runtime timing,
    through the same OnnxRuntimeModel) runs a float32 copy, whose integer layers hold the model's integers."""
    _, module, _, inputs = fit(tmp_path, QuantizationAwareTraining(), "bf16-true")
    model = module.model.eval()
    runtime = OnnxRuntimeModel.from_module(model, inputs[:1])
    assert [value.type for value in runtime.session.get_inputs()] == ["tensor(float)"]
    with torch.no_grad():
        expected = copy.deepcopy(model).float()(inputs.float())
    predicted = runtime(inputs)
    assert torch.equal(predicted.argmax(1), expected.argmax(1))
    assert (predicted - expected).abs().median() < 1e-3  # integer kernels against fake quantization, as in float32


def test_lightning_runs_16_mixed_as_bf16_mixed_on_the_cpu(tmp_path) -> None:
    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU"):
        trainer = quiet_trainer(tmp_path, [], precision="16-mixed")
    assert trainer.precision == "bf16-mixed"


def test_a_quantizer_in_a_bfloat16_model_keeps_its_float32_state_and_rounds_in_float32() -> None:
    """Per tensor (the input) and per channel (the weight): bfloat16 in, the float32 rounding cast to bfloat16 out,
    and the straight-through gradient back in bfloat16."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    quantize_model(model, QuantConfig(observer="mean_std"))
    calibrate(model, [torch.randn(8, 4, generator=generator)])
    layer = model.to(torch.bfloat16)[0]
    state = {name: tensor.dtype for name, tensor in layer.state_dict().items() if tensor.is_floating_point()}
    assert state.pop("weight") == state.pop("bias") == torch.bfloat16
    assert state.pop("input_quantizer.observer.total") == state.pop("input_quantizer.observer.count") == torch.float64
    state.pop("input_quantizer.observer.total_sq")
    assert set(state.values()) == {torch.float32}
    inputs = torch.randn(5, 4, generator=generator).bfloat16().requires_grad_()
    for quantizer, tensor in ((layer.input_quantizer, inputs), (layer.weight_quantizer, layer.weight)):
        rounded = quantizer(tensor)
        assert rounded.dtype == torch.bfloat16
        assert torch.equal(rounded, quantizer(tensor.detach().float()).to(torch.bfloat16))
    layer(inputs).sum().backward()
    assert inputs.grad.dtype == layer.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(inputs.grad).all() and inputs.grad.any() and layer.weight.grad.any()
