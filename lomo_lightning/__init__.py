"""lomo-lightning: full-parameter LLM fine-tuning on limited memory, fused into backward, for Lightning."""

from lomo_lightning.fused import DynamicLossScaler, FusedUpdater
from lomo_lightning.optim import AdaLomo, Lomo

__all__ = ["AdaLomo", "DynamicLossScaler", "FusedUpdater", "Lomo"]
