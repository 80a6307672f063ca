"""torchvision's ResNet family with any number of classes and input channels, and a stem for small images."""

from __future__ import annotations

from torch import nn
from torchvision import models

RESNET_ARCHITECTURES: tuple[str, ...] = tuple(models.list_models(include=["resnet*", "resnext*", "wide_resnet*"]))


def resnet(arch: str = "resnet18", num_classes: int = 10, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """Build an untrained torchvision ResNet (no weights are downloaded).

    ``small_input=True`` swaps the 7x7 stride-2 stem and its max-pool for a 3x3 stride-1 convolution, the
    usual stem for 32x32 (CIFAR) or smaller images; ``in_channels`` changes the stem's input channels.

    Example:
        >>> import torch
        >>> model = resnet("resnet18", num_classes=10, in_channels=1, small_input=True)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    if arch not in RESNET_ARCHITECTURES:
        raise ValueError(f"unknown ResNet architecture {arch!r}; torchvision has {', '.join(RESNET_ARCHITECTURES)}")
    model = models.get_model(arch, weights=None, num_classes=num_classes)
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != model.conv1.in_channels:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    return model
