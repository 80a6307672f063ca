"""torchvision's ``VisionTransformer`` for small images of any channel count, its attention made explicit."""

from __future__ import annotations

import math

from torch import nn
from torchvision.models import VisionTransformer

from lightning_compress.models.attention import explicit_attention


def vision_transformer(
    num_classes: int,
    image_size: int = 28,
    patch_size: int = 7,
    in_channels: int = 1,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 64,
    mlp_dim: int = 128,
    dropout: float = 0.0,
) -> VisionTransformer:
    """A ``VisionTransformer`` (Dosovitskiy et al. 2021) on ``in_channels`` images of ``image_size`` cut in
    ``patch_size`` patches, with :class:`~lightning_compress.models.ExplicitMultiheadAttention` in every
    block (the same outputs as ``nn.MultiheadAttention``, and projections that quantization and head pruning
    reach).

    Example:
        >>> import torch
        >>> model = vision_transformer(num_classes=10, num_layers=2, hidden_dim=32, mlp_dim=64)
        >>> model(torch.zeros(2, 1, 28, 28)).shape, type(model.encoder.layers[0].self_attention).__name__
        (torch.Size([2, 10]), 'ExplicitMultiheadAttention')
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        dropout=dropout,
        attention_dropout=dropout,
        num_classes=num_classes,
    )
    if in_channels != 3:  # torchvision's patch embedding reads RGB; initialized as torchvision does
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(model.conv_proj.bias)
    explicit_attention(model)
    return model
