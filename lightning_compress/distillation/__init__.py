"""Distillation: a frozen teacher's outputs and features as a training signal for a student; for transformers, their
hidden states and attention maps paired across depths."""

from lightning_compress.distillation.layers import EncoderRecorder, LayerStates, checked_layer_map
from lightning_compress.distillation.losses import (
    attention_loss,
    attention_map_loss,
    dkd_loss,
    hidden_state_loss,
    hint_loss,
    kd_loss,
)
from lightning_compress.distillation.module import LOGIT_LOSSES, DistillationModule

__all__ = [
    "LOGIT_LOSSES",
    "DistillationModule",
    "EncoderRecorder",
    "LayerStates",
    "attention_loss",
    "attention_map_loss",
    "checked_layer_map",
    "dkd_loss",
    "hidden_state_loss",
    "hint_loss",
    "kd_loss",
]
