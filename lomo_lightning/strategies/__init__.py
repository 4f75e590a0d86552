"""Lightning strategies that install the fused engine after the model is placed; registered by name on import.

- ``"lomo"``: one device (:class:`LomoStrategy`).
- ``"lomo_ddp"``: replicas; each bucket is updated right after its all-reduce (:class:`LomoDDPStrategy`).
- ``"lomo_fsdp"``: FSDP2 shards; each shard is updated right after its reduce-scatter (:class:`LomoFSDPStrategy`).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lomo_lightning.strategies.base import CHECKPOINT_KEY, FusedStrategyMixin, fused_updater_of
from lomo_lightning.strategies.ddp import LomoDDPStrategy, ReplicatedFusedUpdater
from lomo_lightning.strategies.fsdp import (
    LomoFSDPStrategy,
    ShardedFusedUpdater,
    replicated_parameters,
    save_pretrained_consolidated,
)
from lomo_lightning.strategies.single import LomoStrategy

StrategyRegistry.register(LomoStrategy.strategy_name, LomoStrategy, description="Fused (LOMO-style) updates on one device")
StrategyRegistry.register(
    LomoDDPStrategy.strategy_name, LomoDDPStrategy, description="Fused updates on DDP replicas, after each bucket's all-reduce"
)
StrategyRegistry.register(
    LomoFSDPStrategy.strategy_name, LomoFSDPStrategy, description="Fused updates on FSDP2 shards, after each reduce-scatter"
)

__all__ = [
    "CHECKPOINT_KEY",
    "FusedStrategyMixin",
    "LomoDDPStrategy",
    "LomoFSDPStrategy",
    "LomoStrategy",
    "ReplicatedFusedUpdater",
    "ShardedFusedUpdater",
    "fused_updater_of",
    "replicated_parameters",
    "save_pretrained_consolidated",
]
