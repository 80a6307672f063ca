"""Distillation losses: logit distillation (KD, DKD) and feature distillation (FitNets hints, attention transfer).

Every loss is computed in float32 whatever the training precision: softmax over temperature-softened
half-precision logits loses the small probabilities that carry the teacher's "dark knowledge".
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-softened distributions, batch mean, times T² (Hinton et al. 2015).

    The T² keeps the gradient's scale independent of the temperature, so ``kd_weight`` means the same at
    every T.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
        >>> kd_loss(logits, logits, temperature=4.0).item()
        0.0
        >>> round(kd_loss(torch.zeros(1, 3), logits, temperature=1.0).item(), 4)
        0.5743
    """
    _check_temperature(temperature)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha`` · target-class KD + ``beta`` · non-target-class KD, each times T².

    TCKD compares the binary distributions (target, all others); NCKD compares the distributions over
    the non-target classes alone, where KD's weighting by the teacher's confidence is removed.

    Example:
        >>> import torch
        >>> logits, targets = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
        >>> dkd_loss(logits, logits, targets, temperature=4.0).item()
        0.0
    """
    _check_temperature(temperature)
    student, teacher = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(targets, student.shape[-1]).bool()
    student_p, teacher_p = F.softmax(student, dim=-1), F.softmax(teacher, dim=-1)
    binary_student = torch.stack([(student_p * target).sum(-1), (student_p * ~target).sum(-1)], dim=-1)
    binary_teacher = torch.stack([(teacher_p * target).sum(-1), (teacher_p * ~target).sum(-1)], dim=-1)
    tckd = F.kl_div(binary_student.clamp_min(1e-12).log(), binary_teacher, reduction="batchmean")
    masked = torch.finfo(torch.float32).min
    nckd = F.kl_div(
        F.log_softmax(student.masked_fill(target, masked), dim=-1),
        F.log_softmax(teacher.masked_fill(target, masked), dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (alpha * tckd + beta * nckd) * temperature**2


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al. 2015): mean squared error between (adapted) student and teacher features."""
    return F.mse_loss(student_features.float(), teacher_features.float())


def attention_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): distance of the L2-normalized spatial maps mean_c(f²).

    Channel counts may differ; the spatial sizes must match.

    Example:
        >>> import torch
        >>> features = torch.randn(2, 8, 4, 4)
        >>> round(attention_loss(features, 3 * features).item(), 6)   # the same map up to scale
        0.0
    """
    if student_features.shape[2:] != teacher_features.shape[2:]:
        raise ValueError(
            f"attention transfer needs equal spatial sizes, got {tuple(student_features.shape)} and {tuple(teacher_features.shape)}"
        )

    def attention(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)

    return (attention(student_features) - attention(teacher_features)).pow(2).mean()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
