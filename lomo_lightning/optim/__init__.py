"""Update rules: ordinary ``torch.optim.Optimizer`` subclasses whose step is separable per parameter."""

from lomo_lightning.optim.adalomo import AdaLomo
from lomo_lightning.optim.lomo import Lomo

__all__ = ["AdaLomo", "Lomo"]
