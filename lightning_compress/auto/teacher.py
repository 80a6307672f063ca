"""Distillation from a frozen teacher inside any LightningModule's own training step, without changing it.

A forward hook on the module runs the teacher on the same inputs and passes the student's logits through an
identity whose backward adds the gradient of ``weight * kd_loss(student, teacher)`` to theirs: the module's
loss backpropagates as if that term had been added to it, whatever its ``training_step`` computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_compress.batches import output_logits
from lightning_compress.distillation.losses import kd_loss


class _WithTeacherGradient(torch.autograd.Function):
    """Identity on the student's logits; its backward adds ``d(scale * kd_loss)/d logits`` to the incoming gradient."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, teacher: torch.Tensor, temperature: float, scale: float
    ) -> torch.Tensor:
        ctx.save_for_backward(logits, teacher)
        ctx.temperature, ctx.scale = temperature, scale
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, teacher = ctx.saved_tensors
        with torch.enable_grad():
            student = logits.detach().requires_grad_(True)
            (extra,) = torch.autograd.grad(kd_loss(student, teacher, ctx.temperature) * ctx.scale, student)
        return grad + extra.to(grad.dtype), None, None, None


class TeacherGradient:
    """Adds ``weight * kd_loss(student logits, teacher logits)`` to a module's training loss, through a hook.

    Only forwards in training mode with gradients on are touched; evaluation, sanity checks and
    predictions are left alone. Under 16-bit mixed precision the added gradient is scaled like the loss,
    and with gradient accumulation divided like it.

    Example:
        >>> import copy
        >>> student = torch.nn.Linear(4, 3)
        >>> teacher = TeacherGradient(copy.deepcopy(student), temperature=2.0, weight=1.0)
        >>> handle = teacher.attach(student)
        >>> handle.remove()
    """

    def __init__(self, teacher: nn.Module, temperature: float, weight: float) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.weight = weight

    def attach(self, student: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return student.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None
        with torch.no_grad():
            teacher_logits = output_logits(self.teacher(*args, **kwargs)).detach()
        logits = output_logits(output)
        scale = self.weight * _loss_scale(getattr(module, "_trainer", None))
        return _with_logits(output, _WithTeacherGradient.apply(logits, teacher_logits, self.temperature, scale))


def _loss_scale(trainer: L.Trainer | None) -> float:
    """What the Trainer multiplies the loss by before backward: the AMP scaler's scale over the accumulated batches."""
    if trainer is None:
        return 1.0
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    return scale / trainer.accumulate_grad_batches


def _with_logits(output: Any, logits: torch.Tensor) -> Any:
    """``output`` with its logits (see :func:`output_logits`) replaced by ``logits``."""
    if isinstance(output, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)):
        return type(output)([logits, *output[1:]])
    if isinstance(output, Mapping):
        output["logits"] = logits  # a Hugging Face ModelOutput sets its attribute too
        return output
    output.logits = logits
    return output
