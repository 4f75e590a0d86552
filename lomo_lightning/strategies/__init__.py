"""Lightning strategies that install the fused engine after the model is placed, registered by name on import.

- ``"lomo"``: one device (:class:`LomoStrategy`).
- ``"lomo_ddp"``: replicas; each bucket is updated right after its all-reduce (:class:`LomoDDPStrategy`).
- ``"lomo_fsdp"``: FSDP2 shards; each shard is updated right after its reduce-scatter (:class:`LomoFSDPStrategy`).
- ``"lomo_fsdp_unfused"``: the unfused FSDP2 baseline, sharding Hugging Face models as ``"lomo_fsdp"`` does
  (:class:`FSDP2Strategy`).

Only these names are registered, never one Lightning owns (``register_own_name`` refuses that).

Each class registers itself with ``register_strategies``, as Lightning's own strategies do; Lightning calls
that for the classes of its own package only, so this module calls it for these.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lomo_lightning.strategies.base import CHECKPOINT_KEY, FusedStrategy, fused_updater_of
from lomo_lightning.strategies.ddp import LomoDDPStrategy, ReplicatedFusedUpdater
from lomo_lightning.strategies.fsdp import (
    FSDP2Strategy,
    LomoFSDPStrategy,
    ShardedFusedUpdater,
    replicated_parameters,
    save_pretrained_consolidated,
)
from lomo_lightning.strategies.single import LomoStrategy

for _strategy in (LomoStrategy, LomoDDPStrategy, LomoFSDPStrategy, FSDP2Strategy):
    _strategy.register_strategies(StrategyRegistry)

__all__ = [
    "CHECKPOINT_KEY",
    "FSDP2Strategy",
    "FusedStrategy",
    "LomoDDPStrategy",
    "LomoFSDPStrategy",
    "LomoStrategy",
    "ReplicatedFusedUpdater",
    "ShardedFusedUpdater",
    "fused_updater_of",
    "replicated_parameters",
    "save_pretrained_consolidated",
]
