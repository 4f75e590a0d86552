"""Update rules: ordinary ``torch.optim.Optimizer`` subclasses whose step is separable per parameter."""

from lomo_lightning.optim.adalomo import AdaLomo
from lomo_lightning.optim.lomo import Lomo
from lomo_lightning.optim.sft_adamw import SFTAdamW, SftAdamW
from lomo_lightning.optim.sm3 import SM3

__all__ = ["AdaLomo", "Lomo", "SM3", "SFTAdamW", "SftAdamW"]
