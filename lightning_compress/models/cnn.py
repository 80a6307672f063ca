"""A small convolutional network sized for digits (8x8) and Fashion-MNIST (28x28)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv + BatchNorm + ReLU + max-pool blocks, then two linear layers.

    The input side must be divisible by 4 (two 2x2 poolings).

    Example:
        >>> import torch
        >>> model = SmallCNN(num_classes=10, in_channels=1, image_size=28)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"SmallCNN needs an image_size divisible by 4 (two 2x2 poolings), got {image_size}")
        if len(channels) != 2:
            raise ValueError(f"SmallCNN has two convolution blocks, so channels needs two values, got {list(channels)}")
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(second),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * (image_size // 4) ** 2, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
