from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress.models import SmallCNN
from lightning_compress.quantization import (
    FakeQuantizer,
    Observer,
    QuantConfig,
    quantize_model,
    quantized_layers,
    set_quantization,
)


def test_observers_track_ranges_their_own_way() -> None:
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])]
    expected = {
        "minmax": (-3.0, 2.0),
        "latest": (-3.0, 1.0),
        "moving_average": (-1.0 + 0.5 * (-3.0 + 1.0), 2.0 + 0.5 * (1.0 - 2.0)),
    }
    for kind, (low, high) in expected.items():
        observer = Observer(kind, averaging_constant=0.5)
        for batch in batches:
            observer(batch)
        assert (observer.min_val.item(), observer.max_val.item()) == (low, high), kind


def test_mean_std_observer_clips_to_n_standard_deviations_of_everything_seen() -> None:
    values = torch.cat([torch.randn(10_000, generator=torch.Generator().manual_seed(0)), torch.tensor([40.0])])
    observer = Observer("mean_std", n_std=3.0)
    for chunk in values.split(1000):
        observer(chunk)
    mean, std = values.double().mean().item(), values.double().std(unbiased=False).item()
    assert observer.min_val.item() == pytest.approx(max(mean - 3 * std, values.min().item()), rel=1e-5)
    assert observer.max_val.item() == pytest.approx(mean + 3 * std, rel=1e-5)  # the outlier at 40 is clipped


def test_percentile_observer_ignores_rare_outliers() -> None:
    values = torch.cat([torch.linspace(-1, 1, 100_000), torch.tensor([1000.0])])
    observer = Observer("percentile", percentile=99.9)
    observer(values)
    assert observer.max_val.item() == pytest.approx(float(np.percentile(values.numpy(), 99.9)), rel=1e-4)
    assert observer.max_val.item() < 1.0


def test_per_channel_scales_and_asymmetric_zero_points() -> None:
    observer = Observer("latest", channels=2)
    observer(torch.tensor([[0.5, -1.27], [0.2, 0.1]]))
    scale, zero_point = observer.qparams(-127, 127, symmetric=True)
    torch.testing.assert_close(scale, torch.tensor([0.01, 0.2 / 127]))
    assert zero_point.tolist() == [0, 0]
    observer = Observer("latest")
    observer(torch.tensor([-1.0, 3.0]))
    scale, zero_point = observer.qparams(0, 255, symmetric=False)
    assert scale.item() == pytest.approx(4.0 / 255) and zero_point.item() == round(1.0 / (4.0 / 255))


@pytest.mark.parametrize("symmetric, quant_range", [(True, (-127, 127)), (False, (0, 255))])
def test_fake_quantizer_rounds_onto_the_grid_keeps_zero_and_passes_gradients_straight_through(
    symmetric, quant_range
) -> None:
    quantizer = FakeQuantizer(Observer("minmax"), quant_range, symmetric)
    quantizer(torch.tensor([-0.9, 1.3]))  # observe
    quantizer.eval()
    set_quantization(quantizer, enabled=True)
    x = torch.tensor([-0.9, -0.3333, 0.0, 0.123456, 1.3, 5.0], requires_grad=True)
    y = quantizer(x)
    scale, zero_point = quantizer.scale.item(), quantizer.zero_point.item()
    manual = (torch.clamp(torch.round(x.detach() / scale) + zero_point, *quant_range) - zero_point) * scale
    torch.testing.assert_close(y.detach(), manual)
    assert y[2].item() == 0.0  # a pruned weight stays exactly zero
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # straight through inside the range, zero where clamped


def test_a_symmetric_activation_grid_is_unsigned_while_everything_observed_is_non_negative() -> None:
    quantizer = FakeQuantizer(Observer("minmax"), (-128, 127), True, unsigned_when_non_negative=True)
    quantizer(torch.tensor([0.0, 0.51]))
    assert quantizer.quant_range == (0, 255) and quantizer.scale.item() == pytest.approx(0.002)  # 0.51 / 255
    set_quantization(quantizer, enabled=True)
    assert quantizer.eval()(torch.tensor([-0.3, 0.2, 0.9])).tolist() == pytest.approx(
        [0.0, 0.2, 0.51]
    )  # 100 steps; clipped at 0 and 255
    quantizer.train()(
        torch.tensor([-0.25, 0.5])
    )  # one negative value: signed again, the step from the largest magnitude
    assert quantizer.quant_range == (-128, 127) and quantizer.scale.item() == pytest.approx(0.51 / 127)
    weights = FakeQuantizer(Observer("latest"), (-127, 127), True)  # weights stay signed
    weights(torch.tensor([0.0, 1.0]))
    assert weights.quant_range == (-127, 127)


def test_observers_move_only_in_training_mode() -> None:
    quantizer = FakeQuantizer(Observer("minmax"), (-127, 127), True)
    quantizer(torch.tensor([-1.0, 1.0]))
    quantizer.eval()(torch.tensor([-5.0, 5.0]))
    assert quantizer.observer.max_val.item() == 1.0
    set_quantization(quantizer, observing=False)
    quantizer.train()(torch.tensor([-5.0, 5.0]))
    assert quantizer.observer.max_val.item() == 1.0


def test_learned_scale_starts_from_the_observer_then_learns() -> None:
    quantizer = FakeQuantizer(Observer("minmax"), (-7, 7), True, learnable=True)
    quantizer(torch.tensor([-0.7, 0.7]))
    assert isinstance(quantizer.scale, nn.Parameter) and quantizer.scale.item() == pytest.approx(0.1)
    set_quantization(quantizer, enabled=True)
    quantizer(torch.tensor([0.33, -0.26, 2.0])).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad.item() != 0.0
    quantizer(torch.tensor([-10.0, 10.0]))  # enabled and learned: the observer no longer sets the scale
    assert quantizer.scale.item() == pytest.approx(0.1)


def test_quantize_model_keeps_parameters_and_their_names() -> None:
    model = SmallCNN(num_classes=10, image_size=8)
    before = {name: parameter for name, parameter in model.named_parameters()}
    layers = quantize_model(model, QuantConfig(weight_bits=4))
    assert list(layers) == ["features.0", "features.4", "classifier.1", "classifier.4"]
    assert all(before[name] is parameter for name, parameter in model.named_parameters() if name in before)
    assert set(before) <= set(model.state_dict())
    assert {name for name in model.state_dict() if name not in before} >= {
        "features.0.weight_quantizer.scale",
        "features.0.input_quantizer.enabled",
    }
    assert quantize_model(model, QuantConfig()).keys() == layers.keys()  # a second call changes nothing
    assert quantized_layers(model)["features.0"].weight_quantizer.quant_max == 7


def test_quantized_model_matches_float_until_enabled_and_then_sits_on_the_grid() -> None:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, image_size=8).eval()
    inputs = torch.randn(4, 1, 8, 8)
    float_outputs = model(inputs)
    quantize_model(model, QuantConfig(weight_bits=4, activation_bits=8))
    for module in model.modules():
        module.train(isinstance(module, FakeQuantizer))  # observe without touching BatchNorm statistics
    model(inputs)
    model.eval()
    torch.testing.assert_close(model(inputs), float_outputs)
    set_quantization(model, enabled=True)
    assert not torch.allclose(model(inputs), float_outputs)
    conv = model.features[4]
    levels = conv.weight_quantizer(conv.weight) / conv.weight_quantizer.scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.abs().max().item() == 7.0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weight_bits": 1}, "weight_bits must be an integer from 2 to 8, got 1"),
        ({"activation_bits": 16}, "activation_bits must be an integer from 2 to 8, got 16"),
        (
            {"observer": "histogram"},
            "unknown observer 'histogram'; use one of minmax, moving_average, mean_std, percentile",
        ),
        ({"percentile": 30}, "percentile must be in \\(50, 100\\], got 30"),
    ],
)
def test_bad_settings_fail_when_made(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantConfig(**options)


def test_a_model_without_quantizable_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="ConvTranspose2d has no layer to quantize|has no layer to quantize"):
        quantize_model(nn.Sequential(nn.ConvTranspose2d(1, 2, 3)), QuantConfig())
    with pytest.raises(ValueError, match="cannot be quantized.*'0': 'ConvTranspose2d'"):
        quantize_model(
            nn.Sequential(nn.ConvTranspose2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), QuantConfig(), targets=["0"]
        )
