"""What to prune and by which rule: the settings of a :class:`~lightning_compress.pruning.Pruner`, checked when made."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_compress.arguments import check_argument, is_number
from lightning_compress.pruning.criteria import CRITERIA
from lightning_compress.pruning.masks import SCOPES
from lightning_compress.targets import TargetSpec

GRANULARITIES = ("unstructured", "channel", "head", "N:M such as '2:4'")
#: Granularities that prune whole units (channels, attention heads) which removal can cut out.
STRUCTURED = ("channel", "head")
_AMOUNTS = "a number in [0, 1), a dict of layer name -> amount, or None (with threshold or a callable schedule)"
_N_OF_M = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class PruningConfig:
    """Which weights are pruned (``targets``, ``exclude``), how far (``amount`` or ``threshold``), by which
    importance (``criterion``), in which units (``granularity``) and ranked over what (``scope``).

    ``amount`` is a sparsity in [0, 1), or a dict of layer names to each layer's own sparsity (those layers
    are then the targets, each ranked on its own); N:M granularity implies its sparsity. ``criterion`` is
    one of :data:`~lightning_compress.pruning.CRITERIA` or your own importance, a callable ``score(layer)``
    returning a tensor of the layer's weight shape (unstructured and N:M granularity), as Lightning's
    ``ModelPruning`` takes a function and Torch-Pruning an ``Importance``. Bad settings fail here, before
    any model is touched.

    Example:
        >>> config = PruningConfig(granularity="2:4")
        >>> config.amount, config.n_of_m
        (0.5, (2, 4))
        >>> PruningConfig(amount={"features.0": 0.3, "classifier.1": 0.8}).layer_amounts
        {'features.0': 0.3, 'classifier.1': 0.8}
        >>> PruningConfig(amount=0.5, criterion="l1")
        Traceback (most recent call last):
        ...
        ValueError: unknown criterion 'l1' for unstructured pruning; use one of magnitude, taylor, random (l1 and l2 rank whole channels or heads: granularity='channel' or 'head')
    """

    amount: float | Mapping[str, float] | None = None
    criterion: str | Callable[[nn.Module], torch.Tensor] = "magnitude"
    granularity: str = "unstructured"
    scope: str = "global"
    targets: TargetSpec = None
    exclude: TargetSpec = None
    threshold: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        amount, criterion, granularity, threshold = self.amount, self.criterion, self.granularity, self.threshold
        check_argument("amount", amount, amount is None or isinstance(amount, Mapping) or is_number(amount), _AMOUNTS)
        check_argument("threshold", threshold, threshold is None or is_number(threshold), "a number >= 0 or None")
        n_of_m = _parse_granularity(granularity)
        structured = granularity in STRUCTURED
        if isinstance(amount, Mapping):
            layer_amounts = _check_layer_amounts(amount, self.targets, threshold, n_of_m)
            object.__setattr__(self, "amount", layer_amounts)
            amount = max(layer_amounts.values())
        if callable(criterion):
            if structured:
                raise ValueError(
                    f"a callable criterion scores each weight; {granularity} granularity ranks {granularity}s by one of "
                    + ", ".join(CRITERIA)
                )
        elif criterion not in CRITERIA or (criterion in ("l1", "l2") and not structured):
            allowed = CRITERIA if structured else ("magnitude", "taylor", "random")
            raise ValueError(
                f"unknown criterion {criterion!r} for {granularity} pruning; use one of {', '.join(allowed)}"
                + (
                    " (l1 and l2 rank whole channels or heads: granularity='channel' or 'head')"
                    if criterion in ("l1", "l2")
                    else ""
                )
            )
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if threshold is not None:
            if amount is not None:
                raise ValueError(f"give either amount ({amount}) or threshold ({threshold}), not both")
            if not threshold >= 0 or criterion != "magnitude" or granularity != "unstructured":  # NaN is not >= 0
                raise ValueError(
                    f"threshold={threshold} needs a value >= 0 with criterion='magnitude' and unstructured granularity"
                )
        elif n_of_m:
            n, m = n_of_m
            if amount is not None and abs(amount - (m - n) / m) > 1e-9:
                raise ValueError(
                    f"granularity {granularity!r} means sparsity {(m - n) / m}; amount={amount} contradicts it (leave it out)"
                )
            object.__setattr__(self, "amount", (m - n) / m)
        if amount is not None and not 0.0 <= amount < 1.0:
            raise ValueError(f"amount must be in [0, 1), got {amount}")

    @property
    def structured(self) -> bool:
        """Whether whole units are pruned (channel or head granularity): they trace the model and can be removed."""
        return self.granularity in STRUCTURED

    @property
    def n_of_m(self) -> tuple[int, int] | None:
        """``(n, m)`` for N:M granularity, else ``None``."""
        return _parse_granularity(self.granularity)

    @property
    def layer_amounts(self) -> dict[str, float] | None:
        """Each layer's own sparsity where ``amount`` names them, else ``None``."""
        return dict(self.amount) if isinstance(self.amount, Mapping) else None

    @property
    def final_amount(self) -> float | None:
        """The sparsity the pruning reaches: ``amount``, the largest amount per layer, or ``None`` (threshold)."""
        return max(self.amount.values()) if isinstance(self.amount, Mapping) else self.amount

    @property
    def layers(self) -> TargetSpec:
        """The targets: the layers named by the amounts per layer, or ``targets``."""
        return list(self.amount) if isinstance(self.amount, Mapping) else self.targets


def _check_layer_amounts(
    amounts: Mapping[str, float], targets: TargetSpec, threshold: float | None, n_of_m: tuple[int, int] | None
) -> dict[str, float]:
    """Amounts per layer name, each in [0, 1); they name the targets, so targets, threshold and N:M are out."""
    if targets is not None or threshold is not None or n_of_m:
        raise ValueError(
            "amount per layer names the layers and their sparsity itself: leave out targets, threshold and N:M granularity"
        )
    not_numbers = {layer: amount for layer, amount in amounts.items() if not is_number(amount)}
    if not_numbers:
        kinds = ", ".join(
            f"{amount!r} ({type(amount).__name__}) for {layer!r}" for layer, amount in not_numbers.items()
        )
        raise ValueError(f"amount per layer needs a number in [0, 1) for each layer; got {kinds}")
    amounts = {str(layer): float(amount) for layer, amount in amounts.items()}
    bad = {layer: amount for layer, amount in amounts.items() if not 0.0 <= amount < 1.0}
    if not amounts or bad:
        raise ValueError(f"amount per layer needs at least one layer, each amount in [0, 1); got {bad or amounts}")
    return amounts


def _parse_granularity(granularity: str) -> tuple[int, int] | None:
    """``None`` for unstructured and channel, ``(n, m)`` for an ``"N:M"`` pattern with 0 < N < M."""
    if granularity == "unstructured" or granularity in STRUCTURED:
        return None
    match = _N_OF_M.match(granularity) if isinstance(granularity, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"unknown granularity {granularity!r}; use {' or '.join(GRANULARITIES)} with 0 < N < M")
    return int(match[1]), int(match[2])
