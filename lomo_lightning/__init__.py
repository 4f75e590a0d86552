"""lomo-lightning: full-parameter LLM fine-tuning on limited memory, fused into backward, for Lightning.

Names are imported on first use (PEP 562), so ``from lomo_lightning import AdaLomo, FusedUpdater`` loads
torch only: neither Lightning nor transformers. The strategies register their names with Lightning
(``Trainer(strategy="lomo" | "lomo_ddp" | "lomo_fsdp" | "lomo_fsdp_unfused")``) as soon as both this package and
Lightning are imported, in either order (:mod:`lomo_lightning.registration`); it never takes a name Lightning owns.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from lomo_lightning.registration import register_strategies_with_lightning

try:
    __version__ = version("lomo-lightning")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0"

# public name -> the module that defines it
_EXPORTS = {
    "AdaLomo": "lomo_lightning.optim",
    "Lomo": "lomo_lightning.optim",
    "SM3": "lomo_lightning.optim",
    "SFTAdamW": "lomo_lightning.optim",
    "SftAdamW": "lomo_lightning.optim",  # the name before one casing of acronyms
    "DynamicLossScaler": "lomo_lightning.fused",
    "FusedUpdater": "lomo_lightning.fused",
    "HalfFineTuning": "lomo_lightning.selection",
    "SparseFineTuning": "lomo_lightning.selection",
    "apply_sparse_delta": "lomo_lightning.selection",
    "chunked_causal_lm_loss": "lomo_lightning.objectives.causal_lm",
    "FusedOptimizationMixin": "lomo_lightning.module",
    "CausalLMModule": "lomo_lightning.module",
    "FusedCausalLMModule": "lomo_lightning.module",
    "LomoStrategy": "lomo_lightning.strategies",
    "LomoDDPStrategy": "lomo_lightning.strategies",
    "LomoFSDPStrategy": "lomo_lightning.strategies",
    "FSDP2Strategy": "lomo_lightning.strategies",
    "save_pretrained_consolidated": "lomo_lightning.strategies",
    "HFTResampleCallback": "lomo_lightning.callbacks",
    "SFTReselectionCallback": "lomo_lightning.callbacks",
    "ValidateAtEnd": "lomo_lightning.callbacks",
}

__all__ = [  # the names of _EXPORTS (tests/test_package.py checks they agree)
    "AdaLomo",
    "CausalLMModule",
    "DynamicLossScaler",
    "FSDP2Strategy",
    "FusedCausalLMModule",
    "FusedOptimizationMixin",
    "FusedUpdater",
    "HFTResampleCallback",
    "HalfFineTuning",
    "Lomo",
    "LomoDDPStrategy",
    "LomoFSDPStrategy",
    "LomoStrategy",
    "SFTReselectionCallback",
    "SM3",
    "SFTAdamW",
    "SftAdamW",
    "SparseFineTuning",
    "ValidateAtEnd",
    "__version__",
    "apply_sparse_delta",
    "chunked_causal_lm_loss",
    "save_pretrained_consolidated",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lomo_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from lomo_lightning.callbacks import HFTResampleCallback, SFTReselectionCallback, ValidateAtEnd
    from lomo_lightning.fused import DynamicLossScaler, FusedUpdater
    from lomo_lightning.module import CausalLMModule, FusedCausalLMModule, FusedOptimizationMixin
    from lomo_lightning.objectives.causal_lm import chunked_causal_lm_loss
    from lomo_lightning.optim import SM3, AdaLomo, Lomo, SFTAdamW, SftAdamW
    from lomo_lightning.selection import HalfFineTuning, SparseFineTuning, apply_sparse_delta
    from lomo_lightning.strategies import (
        FSDP2Strategy,
        LomoDDPStrategy,
        LomoFSDPStrategy,
        LomoStrategy,
        save_pretrained_consolidated,
    )

# Trainer(strategy="lomo") works whichever of this package and Lightning is imported first
register_strategies_with_lightning()
