"""LeNet-5 as Caffe defines it, the network of Deep Compression's MNIST results (Han, Mao & Dally 2016)."""

from __future__ import annotations

import torch
from torch import nn

#: Below this side, each convolution pads by 2: two unpadded 5x5 convolutions and two poolings need 16 pixels.
SMALLEST_UNPADDED_SIDE = 16


class LeNet5(nn.Module):
    """Conv 5x5 (20) + max-pool, conv 5x5 (50) + max-pool, linear 500 + ReLU, linear classifier.

    On 28x28 inputs this is Caffe's LeNet-5 exactly (431,080 parameters with 10 classes), the model
    Deep Compression shrinks 39x. Inputs smaller than 16 pixels (the 8x8 digits) are padded by 2 in each
    convolution so that the same layers apply.

    Example:
        >>> model = LeNet5(num_classes=10, image_size=28)
        >>> sum(parameter.numel() for parameter in model.parameters())
        431080
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0) -> None:
        super().__init__()
        padding = 0 if image_size >= SMALLEST_UNPADDED_SIDE else 2
        side = ((image_size + 2 * padding - 4) // 2 + 2 * padding - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5, padding=padding),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5, padding=padding),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * side * side, 500),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
