from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from digits import fit_digits
from torch import nn

from lightning_compress import (
    CompressionReport,
    PostTrainingQuantization,
    half_precision,
)
from lightning_compress.analysis import evaluate_accuracy, size_on_disk
from lightning_compress.quantization import (
    Observer,
    QuantConfig,
    quantize_model,
    quantized_layers,
    quantizers,
)


@pytest.fixture(scope="module")
def float_digits(tmp_path_factory):
    """SmallCNN trained 2 epochs on the digits in float, and its datamodule."""
    _, module, datamodule = fit_digits(tmp_path_factory.mktemp("float"), [], max_epochs=2)
    return module.eval(), datamodule


def test_validate_calibrates_on_the_first_batches_and_quantizes(float_digits) -> None:
    trained, datamodule = float_digits
    module = copy.deepcopy(trained)
    weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[PostTrainingQuantization(calibration_batches=3)],
    )
    trainer.validate(module, dataloaders=datamodule.train_dataloader())
    layers = quantized_layers(module)
    assert len(layers) == 4
    assert {int(layer.input_quantizer.observer.batches) for layer in layers.values()} == {3}
    assert {(bool(q.enabled), bool(q.observing)) for q in quantizers(module)} == {(True, False)}
    for name, parameter in module.named_parameters():
        assert torch.equal(parameter, weights[name]), name  # calibration never trains
    float_accuracy = evaluate_accuracy(trained, datamodule.test_dataloader())
    assert evaluate_accuracy(module, datamodule.test_dataloader()) >= float_accuracy - 0.02


def test_in_fit_the_model_trains_in_float_and_is_calibrated_at_the_end(float_digits, tmp_path) -> None:
    trained, _ = float_digits
    _, module, _ = fit_digits(tmp_path, [PostTrainingQuantization(calibration_batches=2)], max_epochs=2)
    for name, parameter in trained.named_parameters():
        assert torch.equal(module.get_parameter(name), parameter), name  # the same float training
    assert {int(layer.input_quantizer.observer.batches) for layer in quantized_layers(module).values()} == {2}
    assert {bool(q.enabled) for q in quantizers(module)} == {True}


def test_quantize_without_a_trainer_and_clipping_choices(float_digits) -> None:
    trained, datamodule = float_digits
    batches = list(datamodule.train_dataloader())
    ranges = {}
    for observer in ("minmax", "moving_average", "mean_std", "percentile"):
        model = copy.deepcopy(trained)
        assert PostTrainingQuantization(observer=observer, calibration_batches=4).quantize(model, batches) == 4
        ranges[observer] = model.model.features[4].input_quantizer.observer.max_val.item()
    # no clipping keeps the largest value seen; every clipping mode keeps less
    assert all(ranges[observer] < ranges["minmax"] for observer in ("moving_average", "mean_std", "percentile"))


def test_plain_average_of_batch_ranges() -> None:
    observer = Observer("moving_average", averaging_constant=None)
    for low, high in ((-1.0, 1.0), (-3.0, 2.0), (-2.0, 6.0)):
        observer(torch.tensor([low, high]))
    assert (observer.min_val.item(), observer.max_val.item()) == (-2.0, 3.0)


def test_bias_is_rounded_to_the_accumulator_grid() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.bias.mul_(100)  # so an 8-bit accumulator clips
    model = nn.Sequential(layer)
    PostTrainingQuantization(bias_bits=8).quantize(model, [torch.randn(16, 8)])
    step = (layer.input_quantizer.scale * layer.weight_quantizer.scale).detach()
    levels = layer._quantized_bias().detach() / step
    torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0)
    assert levels.abs().max() <= 128 and levels.round().min() >= -128 and levels.round().max() <= 127


def test_half_precision_halves_the_bytes_and_keeps_accuracy(float_digits) -> None:
    trained, datamodule = float_digits
    accuracy = evaluate_accuracy(trained, datamodule.test_dataloader())
    for dtype in ("float16", "bfloat16"):
        half = half_precision(trained, dtype)
        assert {p.dtype for p in half.parameters()} == {getattr(torch, dtype)}
        assert next(trained.parameters()).dtype == torch.float32  # the original is untouched
        assert size_on_disk(half) < 0.55 * size_on_disk(trained)
        assert evaluate_accuracy(half, datamodule.test_dataloader()) >= accuracy - 0.01
    quantized = nn.Sequential(nn.Linear(2, 2))
    quantize_model(quantized, QuantConfig())
    with pytest.raises(ValueError, match="fake-quantized"):
        half_precision(quantized)
    with pytest.raises(ValueError, match="one of float16, bfloat16"):
        half_precision(trained, "float8")


def test_report_adds_the_half_precision_stage(tmp_path) -> None:
    report = CompressionReport(
        output_dir=tmp_path, latency_batch_sizes=(1,), latency_repeats=2, half_precision="bfloat16", verbose=False
    )
    fit_digits(tmp_path, [report], max_epochs=1)
    after, half = report.report.entry("after"), report.report.entry("bfloat16")
    assert half.profile.parameters == after.profile.parameters
    assert half.profile.size_bytes < 0.55 * after.profile.size_bytes
    assert abs(half.val_accuracy - after.val_accuracy) <= 0.01
    with pytest.raises(ValueError, match="half_precision must be None or one of float16, bfloat16, got 'half'"):
        CompressionReport(half_precision="half")


def test_bad_settings_fail_when_made() -> None:
    with pytest.raises(ValueError, match="weight_bits must be an integer from 2 to 8, got 16 .*half_precision"):
        PostTrainingQuantization(weight_bits=16)
    with pytest.raises(ValueError, match="bias_bits must be an integer from 8 to 32, got 4"):
        PostTrainingQuantization(bias_bits=4)
    with pytest.raises(ValueError, match="calibration_batches must be at least 1"):
        PostTrainingQuantization(calibration_batches=0)
    with pytest.raises(ValueError, match="unknown observer 'kl'"):
        PostTrainingQuantization(observer="kl")
