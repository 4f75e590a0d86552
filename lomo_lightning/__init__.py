"""lomo-lightning: full-parameter LLM fine-tuning on limited memory, fused into backward, for Lightning."""

from lomo_lightning.fused import DynamicLossScaler, FusedUpdater
from lomo_lightning.module import FusedOptimizationMixin
from lomo_lightning.optim import SM3, AdaLomo, Lomo, SftAdamW
from lomo_lightning.selection import HalfFineTuning, SparseFineTuning, apply_sparse_delta
from lomo_lightning.strategies import LomoDDPStrategy, LomoFSDPStrategy, LomoStrategy

__all__ = [
    "AdaLomo",
    "DynamicLossScaler",
    "FusedOptimizationMixin",
    "FusedUpdater",
    "HalfFineTuning",
    "Lomo",
    "LomoDDPStrategy",
    "LomoFSDPStrategy",
    "LomoStrategy",
    "SM3",
    "SftAdamW",
    "SparseFineTuning",
    "apply_sparse_delta",
]
