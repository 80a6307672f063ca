"""Distillation losses: logit distillation (KD, DKD), feature distillation (FitNets hints, attention transfer) and
the layer losses of transformers (TinyBERT's hidden states, MiniLM's attention distributions).

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


def hidden_state_loss(
    student_states: torch.Tensor, teacher_states: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """TinyBERT (Jiao et al. 2020): mean squared error between (adapted) student and teacher token states
    ``(N, L, H)``, over the tokens where ``mask`` ``(N, L)`` is nonzero (the attention mask: padding left out).

    Example:
        >>> import torch
        >>> student, teacher = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
        >>> hidden_state_loss(student, teacher, mask=torch.tensor([[1, 1, 0]])).item()   # (1² + 2²) / 2 tokens
        2.5
    """
    if student_states.shape != teacher_states.shape:
        raise ValueError(
            f"hidden states differ in shape: {tuple(student_states.shape)} and {tuple(teacher_states.shape)}"
        )
    per_token = (student_states.float() - teacher_states.float()).pow(2).mean(-1)
    return _masked_mean(per_token, mask)


def attention_map_loss(
    student_attentions: torch.Tensor, teacher_attentions: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MiniLM (Wang et al. 2020): KL(teacher ‖ student) between the attention distributions ``(N, heads, L, L)``
    of each query, summed over keys, averaged over heads and over the queries where ``mask`` ``(N, L)`` is
    nonzero. Where the head counts differ, the distributions averaged over heads are compared.

    The keys a student's attention gives 0 are left out of the sum: the padding, which both models give 0,
    and in training the weights its attention dropout drops (Hugging Face returns the maps after dropout),
    so that the gradient is still the KL's, scaled by 1 - p.

    Example:
        >>> import torch
        >>> uniform, peaked = torch.full((1, 1, 1, 2), 0.5), torch.tensor([[[[0.9, 0.1]]]])
        >>> round(attention_map_loss(uniform, peaked).item(), 4)   # 0.9·ln(0.9/0.5) + 0.1·ln(0.1/0.5)
        0.3681
    """
    if student_attentions.shape[1] != teacher_attentions.shape[1]:
        student_attentions = student_attentions.mean(1, keepdim=True)
        teacher_attentions = teacher_attentions.mean(1, keepdim=True)
    if student_attentions.shape != teacher_attentions.shape:
        raise ValueError(
            f"attention maps differ in shape: {tuple(student_attentions.shape)} and {tuple(teacher_attentions.shape)}"
        )
    student, teacher = student_attentions.float(), teacher_attentions.float()
    kept = student > 0
    log_student = torch.where(kept, student, torch.ones_like(student)).log()  # no log(0), no NaN gradient
    per_key = (torch.special.xlogy(teacher, teacher) - teacher * log_student) * kept
    return _masked_mean(per_key.sum(-1).mean(1), mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` ``(N, L)`` over the positions where ``mask`` is nonzero (all of them without one)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
