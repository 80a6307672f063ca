"""Automatic compression within an accuracy budget: the per-layer plan chosen, trained and proven on validation data."""

from lightning_compress.auto.allocation import least_damage_plan
from lightning_compress.auto.callback import OBJECTIVES, AutoCompression, LayerPlan, Level
from lightning_compress.auto.sensitivity import Candidate, measure_candidates
from lightning_compress.auto.settings import METHODS, LayerSetting

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "AutoCompression",
    "Candidate",
    "LayerPlan",
    "LayerSetting",
    "Level",
    "least_damage_plan",
    "measure_candidates",
]
