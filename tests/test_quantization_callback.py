from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from digits import digits_module, fit_digits
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import PostTrainingQuantization, Pruning, QuantizationAwareTraining
from lightning_compress.data import DigitsDataModule
from lightning_compress.quantization import FakeQuantizer, QuantConfig, quantized_layers


class RecordEpochs(L.Callback):
    """At each training epoch's first batch and at its end: quantizer switches, one scale, BatchNorm statistics."""

    def __init__(self) -> None:
        self.starts: dict[int, dict] = {}
        self.ends: dict[int, dict] = {}

    def _snapshot(self, pl_module) -> dict:
        quantizers = [m for m in pl_module.modules() if isinstance(m, FakeQuantizer)]
        return {
            "enabled": {bool(q.enabled) for q in quantizers},
            "observing": {bool(q.observing) for q in quantizers},
            "input_scale": pl_module.model.features[4].input_quantizer.scale.item(),
            "bn_mean": pl_module.model.features[1].running_mean.clone(),
            "bn_training": pl_module.model.features[1].training,
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.starts[trainer.current_epoch] = self._snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ends[trainer.current_epoch] = self._snapshot(pl_module)


def test_switches_follow_the_epochs(tmp_path) -> None:
    record = RecordEpochs()
    qat = QuantizationAwareTraining(start_epoch=1, freeze_observers_epoch=2, freeze_bn_epoch=2)
    _, module, _ = fit_digits(tmp_path, [qat, record], max_epochs=3)
    assert [record.starts[e]["enabled"] for e in range(3)] == [{False}, {True}, {True}]
    assert [record.starts[e]["observing"] for e in range(3)] == [{True}, {True}, {False}]
    assert record.ends[1]["input_scale"] != record.starts[1]["input_scale"]  # ranges move while observing
    assert record.ends[2]["input_scale"] == record.starts[2]["input_scale"]  # and not once frozen
    assert record.starts[1]["bn_training"] and not record.starts[2]["bn_training"]
    assert torch.equal(record.ends[2]["bn_mean"], record.starts[2]["bn_mean"])  # frozen BatchNorm statistics
    assert not torch.equal(record.ends[1]["bn_mean"], record.starts[1]["bn_mean"])
    assert {bool(m.observing) for m in module.modules() if isinstance(m, FakeQuantizer)} == {False}  # final after fit


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_trained_weights_live_on_the_integer_grid_and_accuracy_holds(tmp_path, weight_bits) -> None:
    qat = QuantizationAwareTraining(weight_bits=weight_bits, start_epoch=1, learnable_scales=weight_bits == 4)
    trainer, module, datamodule = fit_digits(tmp_path, [qat], max_epochs=3)
    for name, layer in quantized_layers(module).items():
        quantizer = layer.weight_quantizer
        levels = quantizer(layer.weight).detach() / quantizer.scale.detach().view(-1, *[1] * (layer.weight.dim() - 1))
        torch.testing.assert_close(levels, levels.round(), atol=1e-3, rtol=0, msg=name)
        assert levels.round().abs().max().item() <= 2 ** (weight_bits - 1) - 1
    assert trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"] > 0.9


def test_pruned_weights_stay_zero_under_fake_quantization(tmp_path) -> None:
    pruning = Pruning(amount=0.5, schedule="oneshot", start_epoch=0)
    _, module, _ = fit_digits(
        tmp_path, [pruning, QuantizationAwareTraining(weight_bits=4, start_epoch=1)], max_epochs=2
    )
    parameters = dict(module.named_parameters())
    pruned = total = 0
    for name, mask in pruning.masks.items():
        layer = quantized_layers(module)[name.removesuffix(".weight")]
        quantized = layer.weight_quantizer(parameters[name]).detach()
        assert torch.equal(quantized[~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(parameters[name][~mask], torch.zeros(int((~mask).sum())))
        pruned, total = pruned + int((quantized == 0).sum()), total + mask.numel()
    assert pruned >= round(0.5 * total)


def test_resumed_run_matches_the_run_that_never_stopped(tmp_path) -> None:
    def qat() -> QuantizationAwareTraining:
        return QuantizationAwareTraining(weight_bits=4, start_epoch=1, freeze_observers_epoch=2, learnable_scales=True)

    _, whole, _ = fit_digits(tmp_path / "a", [qat()], max_epochs=3)
    fit_digits(tmp_path / "b", [qat(), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)], max_epochs=2)
    _, continued, _ = fit_digits(
        tmp_path / "b",
        [qat(), ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)],
        max_epochs=3,
        ckpt_path=str(tmp_path / "b" / "last.ckpt"),
    )
    assert whole.state_dict().keys() == continued.state_dict().keys()
    for (name, value), other in zip(whole.state_dict().items(), continued.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-6, msg=name)


def test_checkpoints_test_and_fit_twice(tmp_path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, module, datamodule = fit_digits(
        tmp_path, [QuantizationAwareTraining(start_epoch=1), checkpoint], max_epochs=2
    )
    in_memory = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    assert (
        trainer.test(module, datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)[0][
            "test/acc"
        ]
        == in_memory
    )
    fresh = digits_module()  # a new float module: the callback quantizes it at setup, then the checkpoint loads
    tester = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[QuantizationAwareTraining(start_epoch=1)]
    )
    assert (
        tester.test(fresh, datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)[0][
            "test/acc"
        ]
        == in_memory
    )
    inputs = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh.eval()(x=inputs), module.eval()(inputs))  # keyword arguments reach forward
    trainer.fit_loop.max_epochs = 3
    trainer.fit(module, datamodule=datamodule)
    assert trainer.current_epoch == 3 and len(quantized_layers(module)) == 4


def test_settings_come_as_a_quant_config_or_as_its_fields_never_both() -> None:
    config = QuantConfig(weight_bits=4, learnable_scales=True)
    assert QuantizationAwareTraining(config=config).config is config
    assert QuantizationAwareTraining(weight_bits=4, learnable_scales=True).config == config
    assert PostTrainingQuantization(weight_bits=4).config == QuantConfig(
        weight_bits=4, observer="minmax", averaging_constant=None
    )
    nested = {
        "_target_": "lightning_compress.QuantizationAwareTraining",
        "config": {
            "_target_": "lightning_compress.quantization.QuantConfig",
            "weight_bits": 4,
            "learnable_scales": True,
        },
    }
    assert instantiate(nested).config == config  # a Hydra recipe may nest the config
    with pytest.raises(
        ValueError,
        match=r"as config=QuantConfig\(...\) or as keyword arguments, not both: got config and \['weight_bits'\]",
    ):
        QuantizationAwareTraining(config=config, weight_bits=8)
    with pytest.raises(
        ValueError,
        match=r"unknown quantizer setting\(s\) \['wieght_bits'\]; the settings are weight_bits, activation_bits",
    ):
        QuantizationAwareTraining(wieght_bits=4)
    with pytest.raises(
        ValueError, match=r"unknown quantizer setting\(s\) \['learnable_scales'\]"
    ):  # step sizes are learned in training
        PostTrainingQuantization(learnable_scales=True)
    with pytest.raises(ValueError, match="weight_bits must be an integer from 2 to 8, got 9"):
        PostTrainingQuantization(weight_bits=9)


def test_bad_epochs_fail_in_init_and_bad_targets_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match="freeze_observers_epoch \\(1\\) must not be before start_epoch \\(2\\)"):
        QuantizationAwareTraining(start_epoch=2, freeze_observers_epoch=1)
    with pytest.raises(ValueError, match="start_epoch must be >= 0, got -1"):
        QuantizationAwareTraining(start_epoch=-1)
    module = digits_module()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        callbacks=[QuantizationAwareTraining(targets=["model.clasifier.*"])],
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="'model.clasifier.\\*' matches no layer.*model.classifier"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    with pytest.warns(UserWarning, match="never switches fake quantization on within max_epochs=2"):
        fit_digits(tmp_path, [QuantizationAwareTraining(start_epoch=2)], max_epochs=2)


class CopyBeforeRemoval(L.Callback):
    """Keeps a copy of the masked, quantized module as training ends (listed before ``Pruning``, it runs first)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.masked = copy.deepcopy(pl_module).eval()


@pytest.mark.parametrize("quantization_first", [False, True])
def test_channel_removal_after_quantization_cuts_the_weight_scales_and_keeps_the_outputs(
    tmp_path, quantization_first
) -> None:
    copy_before = CopyBeforeRemoval()
    removal = Pruning(
        amount=0.5,
        granularity="channel",
        criterion="l1",
        scope="layer",
        schedule="oneshot",
        start_epoch=0,
        remove_channels=True,
    )
    qat = QuantizationAwareTraining(start_epoch=1)
    callbacks = [copy_before, qat, removal] if quantization_first else [copy_before, removal, qat]
    _, module, datamodule = fit_digits(tmp_path, callbacks, max_epochs=2)
    conv = module.model.features[0]
    assert conv.out_channels == 16 and conv.weight.shape[0] == 16  # SmallCNN's 32 channels halved
    for name, layer in quantized_layers(module).items():
        for tensor_name, tensor in layer.output_channel_state().items():
            assert tensor.shape == (layer.weight.shape[0],), f"{name}.{tensor_name}"
    inputs = datamodule.splits["test"].tensors[0]
    removed, masked = module.eval()(inputs), copy_before.masked(inputs)
    # Fewer channels sum in another order (differences near 1e-6), which moves an activation lying on a
    # rounding boundary of the next quantizer one step: a few outputs differ by that step, the rest agree.
    differing = (removed - masked).abs() > 1e-4
    assert differing.float().mean() < 0.01
    assert (removed.argmax(1) == masked.argmax(1)).float().mean() >= 0.99
    masked_conv = copy_before.masked.model.features[0]
    kept = masked_conv.weight.flatten(1).abs().sum(1) > 0
    assert torch.equal(conv.weight_quantizer.scale, masked_conv.weight_quantizer.scale[kept])
