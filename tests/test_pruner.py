"""Pruning from plain PyTorch: Pruner, prune_ and PruningConfig, no Lightning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress import Pruner, PruningConfig, prune_
from lightning_compress.models import SmallCNN


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def zeros(model: nn.Module) -> dict[str, int]:
    return {
        name: int((parameter == 0).sum()) for name, parameter in model.named_parameters() if name.endswith("weight")
    }


def test_prune_reaches_the_amount_to_the_element_globally_and_per_layer() -> None:
    model = mlp()
    prune_(model, 0.75)
    assert sum(zeros(model).values()) == round(0.75 * (16 * 32 + 32 * 8))
    model = mlp()
    prune_(model, 0.75, scope="layer")
    assert zeros(model) == {"0.weight": 384, "2.weight": 192}


def test_masks_only_grow_and_stay_under_an_optimizer() -> None:
    model = mlp()
    pruner = Pruner(model, PruningConfig(amount=0.8))
    pruner.prune(0.5)
    first = {name: mask.clone() for name, mask in pruner.masks.items()}
    with torch.no_grad():
        model[0].weight.mul_(-3.0)  # change every magnitude ranking the masks could follow
    pruner.prune(0.3)  # a lower target never revives a weight
    assert all(torch.equal(pruner.masks[name], first[name]) for name in first)
    pruner.prune()  # the config's amount
    assert all(bool((first[name] | ~pruner.masks[name]).all()) for name in first)  # pruned stays pruned
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = pruner.attach(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
    assert sum(zeros(model).values()) == round(0.8 * (16 * 32 + 32 * 8))
    handle.remove()
    optimizer.zero_grad()
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    assert sum(zeros(model).values()) < round(0.8 * (16 * 32 + 32 * 8))  # detached: SGD moves the zeros again


def test_state_dict_carries_the_masks_to_another_copy() -> None:
    model = mlp()
    pruner = prune_(model, 0.6)
    other = mlp()
    restored = Pruner(other, PruningConfig(amount=0.6))
    restored.load_state_dict(copy.deepcopy(pruner.state_dict()))
    restored.apply()
    assert all(torch.equal(other.state_dict()[name] == 0, model.state_dict()[name] == 0) for name in zeros(model))


def test_channel_and_n_of_m_granularities() -> None:
    model = SmallCNN(num_classes=10, image_size=8)
    with pytest.raises(ValueError, match="channel pruning traces the model on one input: give example_input"):
        prune_(model, 0.25, granularity="channel", criterion="l1", scope="layer")
    pruner = prune_(
        model, 0.25, granularity="channel", criterion="l1", scope="layer", example_input=torch.zeros(2, 1, 8, 8)
    )
    assert {name: int((~keep).sum()) for name, keep in pruner.channel_keep.items()} == {
        "features.0": 8,
        "features.4": 16,
        "classifier.1": 32,
    }
    assert int((model.features[0].weight.flatten(1).abs().sum(1) == 0).sum()) == 8  # whole output channels
    model = mlp()
    prune_(model, granularity="2:4")
    groups = model[0].weight.reshape(32, 4, 4)
    assert bool(((groups != 0).sum(-1) <= 2).all()) and zeros(model)["0.weight"] == 256


def test_a_callable_criterion_is_a_users_own_importance() -> None:
    model = mlp()
    original = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    # prune the weights closest to +0.05, whatever their magnitude: no built-in criterion ranks that way
    prune_(model, 0.5, criterion=lambda layer: (layer.weight - 0.05).abs(), scope="layer")
    for layer, weight in zip((model[0], model[2]), original):
        distance = (weight - 0.05).abs().flatten()
        pruned = torch.zeros_like(distance, dtype=torch.bool)
        pruned[distance.argsort()[: distance.numel() // 2]] = True
        assert torch.equal(layer.weight.flatten() == 0, pruned)
    with pytest.raises(
        ValueError, match=r"the criterion's score for '0.weight' has shape \(32,\); it must be the weight's, \(32, 16\)"
    ):
        prune_(mlp(), 0.5, criterion=lambda layer: layer.weight.sum(1))
    with pytest.raises(
        ValueError, match="a callable criterion scores each weight; channel granularity ranks channels by one of"
    ):
        PruningConfig(amount=0.5, criterion=lambda layer: layer.weight, granularity="channel")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"amount": 1.0}, r"amount must be in \[0, 1\), got 1.0"),
        ({"amount": 0.5, "threshold": 0.1}, r"give either amount \(0.5\) or threshold \(0.1\), not both"),
        ({"amount": 0.5, "granularity": "3:2"}, r"unknown granularity '3:2'"),
        ({"amount": 0.5, "scope": "model"}, r"unknown scope 'model'"),
        ({"amount": {"features.0": 1.2}}, r"each amount in \[0, 1\); got \{'features.0': 1.2\}"),
    ],
)
def test_bad_settings_fail_when_the_config_is_made(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PruningConfig(**settings)
