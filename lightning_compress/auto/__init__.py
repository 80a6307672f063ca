"""Automatic compression within an accuracy budget: the per-layer plan chosen, trained and proven on validation data."""

from lightning_compress.auto.allocation import least_damage_plan
from lightning_compress.auto.callback import OBJECTIVES, AutoCompression, LayerPlan, Level
from lightning_compress.auto.post_training import GRIDS, BitPlan, allocate_bits, weight_onnx_bytes
from lightning_compress.auto.sensitivity import Candidate, measure_candidates
from lightning_compress.auto.settings import METHODS, LayerSetting

__all__ = [
    "GRIDS",
    "METHODS",
    "OBJECTIVES",
    "AutoCompression",
    "BitPlan",
    "Candidate",
    "LayerPlan",
    "LayerSetting",
    "Level",
    "allocate_bits",
    "least_damage_plan",
    "measure_candidates",
    "weight_onnx_bytes",
]
