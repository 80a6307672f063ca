"""When to prune and to which sparsity: one-shot, linear and the cubic gradual schedule of Zhu & Gupta (2017)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("oneshot", "linear", "agp")


@dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity at the pruning epochs ``start_epoch, start_epoch + frequency, ..., end_epoch``.

    Masks are recomputed at the start of each pruning epoch. With ``n`` pruning steps, step ``k``
    (1-based) aims at ``amount * k / n`` for ``"linear"`` and ``amount * (1 - (1 - k / n) ** 3)`` for
    ``"agp"`` (Zhu & Gupta's s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3 with s_i = 0): large steps
    early, small ones near the end. ``"oneshot"`` prunes to ``amount`` at ``start_epoch`` alone. A
    callable ``epoch -> sparsity`` is asked at every epoch from ``start_epoch`` to ``end_epoch``. The
    last step always lands on ``amount`` exactly; targets never compound.

    Example:
        >>> schedule = SparsitySchedule(amount=0.9, kind="agp", start_epoch=0, end_epoch=3)
        >>> [round(schedule.sparsity_at(epoch), 4) for epoch in schedule.pruning_epochs()]
        [0.5203, 0.7875, 0.8859, 0.9]
    """

    amount: float
    kind: str | Callable[[int], float] = "agp"
    start_epoch: int = 0
    end_epoch: int = 0
    frequency: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.kind, str) and self.kind not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.kind!r}; use one of {', '.join(SCHEDULES)} or a callable epoch -> sparsity"
            )
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {self.start_epoch}")
        if self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch ({self.end_epoch}) must not be before start_epoch ({self.start_epoch})")
        if self.frequency < 1:
            raise ValueError(f"frequency must be a positive number of epochs, got {self.frequency}")

    def pruning_epochs(self) -> list[int]:
        """The epochs at whose start the masks are recomputed."""
        if self.kind == "oneshot":
            return [self.start_epoch]
        step = 1 if callable(self.kind) else self.frequency
        epochs = list(range(self.start_epoch, self.end_epoch + 1, step))
        return epochs if epochs[-1] == self.end_epoch else [*epochs, self.end_epoch]

    def sparsity_at(self, epoch: int) -> float:
        """Target sparsity for the masks computed at the start of ``epoch`` (the last target before it if no step)."""
        epochs = self.pruning_epochs()
        done = [e for e in epochs if e <= epoch]
        if not done:
            return 0.0
        if callable(self.kind):
            target = float(self.kind(done[-1]))
            if not 0.0 <= target < 1.0:
                raise ValueError(
                    f"the schedule callable returned {target} for epoch {done[-1]}; sparsity must be in [0, 1)"
                )
            return target
        progress = len(done) / len(epochs)
        if self.kind == "linear":
            return self.amount * progress
        return self.amount * (1.0 - (1.0 - progress) ** 3)
