"""Selections: which parameters, or which entries of them, learn."""

from lomo_lightning.selection.base import Selection, modules_matching
from lomo_lightning.selection.hft import HalfFineTuning, HFTConfig, HftConfig, HFTMask, HFTPatterns
from lomo_lightning.selection.sft import SFTConfig, SftConfig, SparseFineTuning, apply_sparse_delta, delta_size_report

__all__ = [
    "HalfFineTuning",
    "HFTConfig",
    "HftConfig",
    "HFTMask",
    "HFTPatterns",
    "Selection",
    "SFTConfig",
    "SftConfig",
    "SparseFineTuning",
    "apply_sparse_delta",
    "delta_size_report",
    "modules_matching",
]
