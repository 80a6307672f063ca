"""Channel pruning of depthwise convolutions (MobileNets, EfficientNet) with removal, without an exclude list."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import efficientnet_b0, mobilenet_v2, mobilenet_v3_small

from lightning_compress.pruning import Pruner, PruningConfig


@pytest.mark.parametrize("make", [mobilenet_v2, mobilenet_v3_small, efficientnet_b0], ids=lambda make: make.__name__)
def test_depthwise_models_shrink_by_channels_with_the_same_outputs(make) -> None:
    torch.manual_seed(0)
    model = make(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    pruner = Pruner(model, PruningConfig(amount=0.5, granularity="channel", scope="layer"), example_input=images[:1])
    pruner.prune()
    with torch.no_grad():
        masked = model(images)
    before = sum(parameter.numel() for parameter in model.parameters())
    pruner.remove_channels(model)
    after = sum(parameter.numel() for parameter in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(images), masked, atol=1e-5, rtol=1e-5)
    assert after < 0.3 * before  # half the channels in and out of (nearly) every layer
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_a_convolution_grouped_across_channels_is_refused_at_setup() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"'1' is grouped \(2 groups of several channels\)"):
        Pruner(model, PruningConfig(amount=0.5, granularity="channel"), example_input=torch.zeros(1, 4, 8, 8))
