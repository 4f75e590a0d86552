"""Selections: which parameters, or which entries of them, learn."""

from lomo_lightning.selection.base import GradientRoute, gradient_routes, register_routes
from lomo_lightning.selection.hft import HalfFineTuning, HFTMask, HFTPatterns
from lomo_lightning.selection.sft import SparseFineTuning, apply_sparse_delta, delta_size_report

__all__ = [
    "GradientRoute",
    "gradient_routes",
    "register_routes",
    "HalfFineTuning",
    "HFTMask",
    "HFTPatterns",
    "SparseFineTuning",
    "apply_sparse_delta",
    "delta_size_report",
]
