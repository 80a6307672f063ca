"""The per-layer plan: one setting per layer, the least predicted damage within a byte budget, solved exactly.

Choosing one candidate per layer to minimize the summed damage under a cap on the summed cost is a
multiple-choice knapsack; it is solved as the integer program of HAWQ-V3 (Yao et al. 2021), binary choice
variables, one equality per layer and one cost constraint, by SciPy's ``milp`` (HiGHS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from lightning_compress.auto.sensitivity import Candidate


def least_damage_plan(
    options: Mapping[str, Sequence[Candidate]], max_cost: float, min_cost: float = -np.inf
) -> dict[str, Candidate] | None:
    """The candidate of each layer that together cost at most ``max_cost`` (and at least ``min_cost``) with the
    least summed damage; ``None`` when no choice fits between the two. Ties go to the cheaper plan.

    Example:
        >>> from lightning_compress.auto.settings import LayerSetting
        >>> options = {
        ...     "a": [Candidate("a", LayerSetting(), 0.0, 100), Candidate("a", LayerSetting(0.9), 0.5, 10)],
        ...     "b": [Candidate("b", LayerSetting(), 0.0, 100), Candidate("b", LayerSetting(0.9), 0.1, 10)],
        ... }
        >>> {layer: c.setting.sparsity for layer, c in least_damage_plan(options, max_cost=120).items()}
        {'a': 0.0, 'b': 0.9}
        >>> least_damage_plan(options, max_cost=10) is None
        True
        >>> {layer: c.setting.sparsity for layer, c in least_damage_plan(options, 200, min_cost=200).items()}
        {'a': 0.0, 'b': 0.0}
    """
    layers = list(options)
    choices = [(layer, candidate) for layer in layers for candidate in options[layer]]
    damage = np.array([candidate.damage for _, candidate in choices])
    cost = np.array([float(candidate.cost) for _, candidate in choices])
    # Damage first; a cost term too small to outweigh any damage difference breaks ties towards fewer bytes.
    tie_break = (np.ptp(damage[damage > 0]) if (damage > 0).any() else 1.0) * 1e-9 / max(cost.sum(), 1.0)
    one_per_layer = np.array([[float(layer == name) for name, _ in choices] for layer in layers])
    result = milp(
        damage + tie_break * cost,
        integrality=np.ones(len(choices)),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_per_layer, 1, 1), LinearConstraint(cost[None, :], min_cost, max_cost)],
    )
    if result.x is None:
        return None
    return {layer: candidate for (layer, candidate), chosen in zip(choices, result.x) if chosen > 0.5}


def plan_cost(plan: Mapping[str, Candidate]) -> int:
    """The summed cost of a plan's candidates."""
    return sum(candidate.cost for candidate in plan.values())


def cheapest_plan(options: Mapping[str, Sequence[Candidate]]) -> dict[str, Candidate]:
    """The cheapest candidate of each layer (the least damage among equally cheap ones)."""
    return {layer: min(candidates, key=lambda c: (c.cost, c.damage)) for layer, candidates in options.items()}
