"""Selections: which parameters, or which entries of them, learn."""

from lomo_lightning.selection.hft import HalfFineTuning, HFTMask, HFTPatterns
from lomo_lightning.selection.sft import SftConfig, SparseFineTuning, apply_sparse_delta, delta_size_report

__all__ = [
    "HalfFineTuning",
    "HFTMask",
    "HFTPatterns",
    "SftConfig",
    "SparseFineTuning",
    "apply_sparse_delta",
    "delta_size_report",
]
