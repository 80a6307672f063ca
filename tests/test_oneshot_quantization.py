"""One-shot quantization: GPTQ and round-to-nearest on the project's quantizers, the rounded weights kept by
fake quantization and written by the 4-bit ONNX export, and bad settings refused."""

from __future__ import annotations

import copy

import onnx
import onnxruntime
import pytest
import torch
from digits import digits_module, fit_digits, quiet_trainer
from onnx import TensorProto, numpy_helper
from test_int4_export import stored_weights
from test_oneshot_core import correlated_inputs
from torch import nn

from lightning_compress.data import DigitsDataModule
from lightning_compress.deploy import onnx_bytes
from lightning_compress.oneshot import OneShotQuantization
from lightning_compress.oneshot.quantization import OneShotQuantizationConfig, one_shot_quantize
from lightning_compress.quantization import QuantConfig

W4 = QuantConfig(weight_bits=4, observer="minmax", activation_symmetric=False)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))


def quantized(model: nn.Module, inputs: torch.Tensor, **settings) -> nn.Module:
    result = copy.deepcopy(model)
    one_shot_quantize(result, inputs.split(128), OneShotQuantizationConfig(**settings), progress=False)
    return result.eval()


def output_error(model: nn.Module, dense: nn.Module, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(inputs) - dense(inputs)).square().mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_4_bit_weights_change_the_outputs_less_than_round_to_nearest(act_order):
    dense, inputs = mlp().eval(), correlated_inputs(features=32)
    gptq = quantized(dense, inputs, method="gptq", quantization=W4, act_order=act_order)
    nearest = quantized(dense, inputs, method="rtn", quantization=W4)
    assert output_error(gptq, dense, inputs) < 0.7 * output_error(nearest, dense, inputs)


def test_fake_quantization_keeps_the_rounded_weights_and_the_4_bit_export_writes_them():
    dense, inputs = mlp().eval(), correlated_inputs(features=32)
    model = quantized(dense, inputs, quantization=W4)
    for layer in (model[0], model[2]):
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
        integers = layer.weight / layer.weight_quantizer.scale.unsqueeze(1)
        assert torch.allclose(integers, integers.round(), atol=1e-4) and integers.round().abs().max() <= 7
    graph = onnx.load_from_string(onnx_bytes(model, inputs[:1]))
    stored = stored_weights(graph)
    assert sorted(stored) == ["model.0.weight", "model.2.weight"]  # onnx_bytes wraps the model
    for name, tensor in stored.items():
        layer = model.get_submodule(name.split(".")[1])
        assert tensor.data_type == TensorProto.INT4
        rows = layer.weight.detach() / layer.weight_quantizer.scale.unsqueeze(1)
        assert torch.equal(torch.from_numpy(numpy_helper.to_array(tensor).astype("float32")), rows.round())
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(inputs[:64])
    ran = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs[:64].numpy()})[0])
    torch.testing.assert_close(ran, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "awq"}, "method must be one of gptq, rtn"),
        ({"quantization": QuantConfig(per_channel=False)}, "per_channel=True and learnable_scales=False"),
        ({"quantization": "int4"}, "quantization must be a QuantConfig"),
        ({"damping": -0.1}, "damping must be a number >= 0"),
    ],
)
def test_bad_settings_fail_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        OneShotQuantizationConfig(**settings)


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match="rounds nn.Linear layers; the targets also name"):
        one_shot_quantize(
            nn.Sequential(nn.Conv2d(1, 2, 3)),
            [torch.randn(2, 1, 6, 6)],
            OneShotQuantizationConfig(targets=[nn.Conv2d]),
            progress=False,
        )


def test_in_validate_gptq_quantizes_before_the_pass_and_in_a_fit_when_training_ends(tmp_path):
    datamodule = DigitsDataModule()
    datamodule.setup()
    module = digits_module()
    gptq = OneShotQuantization(quantization=W4, calibration_batches=2, progress=False)
    quiet_trainer(tmp_path, [gptq]).validate(module, datamodule.val_dataloader(), verbose=False)
    layers = [module.model.classifier[1], module.model.classifier[4]]
    for layer in layers:
        assert bool(layer.weight_quantizer.enabled) and not bool(layer.weight_quantizer.observing)
        assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # the GPTQ weights, kept
    assert not hasattr(module.model.features[0], "weight_quantizer")  # convolutions stay float

    _, fitted, _ = fit_digits(tmp_path / "fit", [OneShotQuantization(quantization=W4, progress=False)], max_epochs=1)
    layer = fitted.model.classifier[1]
    assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)
    assert len(torch.unique(layer.weight[0])) <= 15  # one 4-bit grid a row


def test_the_callback_takes_the_grids_as_keyword_settings_over_its_4_bit_defaults():
    callback = OneShotQuantization(weight_bits=8, group_size=64)
    assert callback.config.quantization == QuantConfig(weight_bits=8, observer="minmax", group_size=64)
    assert OneShotQuantization().config.quantization == OneShotQuantizationConfig().quantization
    with pytest.raises(ValueError, match=r"not both: got config and \['group_size'\]"):
        OneShotQuantization(quantization=W4, group_size=64)
    with pytest.raises(ValueError, match=r"unknown quantizer setting\(s\) \['groups'\]"):
        OneShotQuantization(groups=64)
    with pytest.raises(ValueError, match="quantization must be a QuantConfig"):
        OneShotQuantization(quantization="int4")


def test_the_callback_refuses_zero_calibration_batches_and_settings_given_twice():
    with pytest.raises(ValueError, match="calibration_batches must be an int >= 1"):
        OneShotQuantization(calibration_batches=0)
    with pytest.raises(ValueError, match=r"not both: got config and \['act_order'\]"):
        OneShotQuantization(act_order=True, config=OneShotQuantizationConfig())


def test_in_a_fit_grids_that_do_not_fit_a_target_fail_at_setup_before_a_step(tmp_path):
    module = digits_module()
    groups = OneShotQuantization(quantization=QuantConfig(weight_bits=4, group_size=96), progress=False)
    trainer = quiet_trainer(tmp_path, [groups])
    with pytest.raises(ValueError, match=r"group_size=96 must divide the 256 input features of model.classifier.1"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    convolutions = OneShotQuantization(targets=[nn.Conv2d], progress=False)
    with pytest.raises(ValueError, match="rounds nn.Linear layers; the targets also name"):
        quiet_trainer(tmp_path, [convolutions]).fit(digits_module(), datamodule=DigitsDataModule())
