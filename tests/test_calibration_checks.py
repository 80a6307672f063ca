"""Calibration data is checked: a NaN in a calibration batch, or an activation that overflows on one, stops a
one-shot method or a post-training calibration with an error naming the batch (and the layer), and a failed
one-shot call leaves the model as it was."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_compress.oneshot import (
    OneShotPruningConfig,
    OneShotQuantizationConfig,
    one_shot_prune,
    one_shot_quantize,
)
from lightning_compress.quantization import QuantConfig, calibrate, quantize_model, quantized_layers

METHODS: dict[str, Callable[[nn.Module, list[torch.Tensor]], object]] = {
    "rtn": lambda model, batches: one_shot_quantize(
        model, batches, OneShotQuantizationConfig(method="rtn"), progress=False
    ),
    "gptq": lambda model, batches: one_shot_quantize(model, batches, OneShotQuantizationConfig(), progress=False),
    "wanda": lambda model, batches: one_shot_prune(
        model, batches, OneShotPruningConfig(method="wanda", amount=0.5), progress=False
    ),
    "sparsegpt": lambda model, batches: one_shot_prune(
        model, batches, OneShotPruningConfig(method="sparsegpt", amount=0.5), progress=False
    ),
}


def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), [torch.randn(32, 8) for _ in range(4)]


@pytest.mark.parametrize("method", list(METHODS))
def test_a_nan_in_a_calibration_batch_stops_the_method_and_leaves_the_model_as_it_was(method: str) -> None:
    model, batches = model_and_batches()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batches[2][5, 3] = float("nan")
    with pytest.raises(ValueError, match="calibration batch 2 holds 1 NaN or infinite input value"):
        METHODS[method](model, batches)
    assert not quantized_layers(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())


class SquareRoot(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sqrt()  # NaN below zero: an activation that breaks on some batches only


@pytest.mark.parametrize("method", ["gptq", "wanda", "sparsegpt"])
def test_a_layer_whose_inputs_turn_nan_on_a_finite_batch_is_named_with_the_batch(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), SquareRoot(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    batches = [torch.rand(32, 8) for _ in range(4)]
    batches[1] = -batches[1]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="the inputs of layer '2' on calibration batch 1 are NaN or infinite, though"):
        METHODS[method](model, batches)
    assert not quantized_layers(model)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("method", ["gptq", "wanda", "sparsegpt"])
def test_inputs_whose_products_overflow_name_the_layer_and_the_batch(method: str) -> None:
    """Before, SparseGPT and GPTQ advised a larger damping, which cannot help."""
    model, batches = model_and_batches()
    batches[1][0] = 1e38
    with pytest.raises(
        ValueError,
        match=r"the products of the inputs of layer '0' overflow on calibration batch 1 \(inputs up to 1e\+38\)",
    ):
        METHODS[method](model, batches)
    assert not quantized_layers(model)


def test_post_training_calibration_refuses_a_nan_batch() -> None:
    model, batches = model_and_batches()
    quantize_model(model, QuantConfig(observer="minmax"))
    batches[3][0, 0] = float("inf")
    with pytest.raises(ValueError, match="Calibration observes the ranges of its batches, but calibration batch 3"):
        calibrate(model, batches)
