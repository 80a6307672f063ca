"""Distillation: a frozen teacher's outputs and features as a training signal for a student."""

from lightning_compress.distillation.losses import (
    attention_loss,
    dkd_loss,
    hint_loss,
    kd_loss,
)
from lightning_compress.distillation.module import LOGIT_LOSSES, DistillationModule

__all__ = ["LOGIT_LOSSES", "DistillationModule", "attention_loss", "dkd_loss", "hint_loss", "kd_loss"]
