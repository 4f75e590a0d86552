"""FSDP2 for Hugging Face models: strategy="lomo_fsdp_unfused" (unfused) and strategy="lomo_fsdp" (fused updates on shards).

What the module holds: :class:`ShardedFusedUpdater` (the engine on FSDP2 shards, usable without Lightning),
:func:`shard_transformers` (``fully_shard`` per transformer block, then each model root, leaving
:func:`replicated_parameters` whole), :class:`FSDP2Strategy` (Lightning's ``ModelParallelStrategy`` on a
1-D mesh that shards the model itself, the unfused baseline), :class:`LomoFSDPStrategy` (the same with
the fused engine) and :func:`save_pretrained_consolidated` (a plain Hugging Face checkpoint from shards).

FSDP2 reduce-scatters each block's gradients in its post-backward and then runs the
``register_post_accumulate_grad_hook`` hooks of the *sharded* parameters (``DTensor`` on ``Shard(0)``),
so the engine's ordinary hook sees the final, averaged gradient of the local shard and nothing else.
The update rule acts on that shard; statistics spanning a whole tensor are completed inside the rule
(:class:`~lomo_lightning.layout.ShardLayout`), the global gradient norm and the skip verdict by the
placement (:class:`~lomo_lightning.placement.Shards`).

Sparse fine-tuning's values are small and stay out of ``fully_shard`` (``ignored_params``): replicated,
whole on every rank. FSDP2 does not reduce their gradients, so the engine averages them over the ranks
before the rule runs, and every rank takes the same step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lomo_lightning._compat import materialize_distributed_module, optimizers_to_device, set_device_mesh
from lomo_lightning.checkpointing import check_metadata_digest, publish_directory, staging_path, write_metadata_digest
from lomo_lightning.files import remove_entry
from lomo_lightning.fused import FusedUpdater
from lomo_lightning.placement import Shards
from lomo_lightning.selection.sft import SparseDeltaLinear, merge_sparse_deltas
from lomo_lightning.selection.sft.quantize import is_quantized
from lomo_lightning.strategies.base import FusedStrategy, register_own_name
from lomo_lightning.strategies.fsdp_units import UNITS, choose_unit, gathered_budget, set_prefetching, units_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lomo_lightning._compat import StrategyRegistry


class ShardedFusedUpdater(FusedUpdater):
    """The engine on FSDP2 shards (:class:`~lomo_lightning.placement.Shards`): the squared gradient norm is
    summed over ranks, the skip verdict agreed, the collectives of split rules batched per FSDP unit.

    Usable without Lightning: ``fully_shard`` the model first, then
    ``ShardedFusedUpdater(model, AdaLomo(model.parameters()), group=mesh.get_group())``.

    Parameters left out of ``fully_shard`` (sparse fine-tuning's values, see :func:`replicated_parameters`)
    are whole on every rank: their gradients are averaged over the group (one all-reduce each) before
    the rule runs, and their norm counts once in the global norm.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, group: dist.ProcessGroup | None = None, **kwargs: Any):
        super().__init__(model, optimizer, placement=Shards(group, replicated=replicated_parameters(model)), **kwargs)


def transformer_roots(module: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face ``PreTrainedModel`` instances inside ``module`` (or ``module`` itself)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    if isinstance(module, PreTrainedModel):
        return [module]
    roots: list[nn.Module] = []
    for child in module.children():
        roots.extend(transformer_roots(child))
    return roots


def shard_transformers(
    module: nn.Module,
    mesh: Any,
    layer_classes: Iterable[str] | None = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    unit: str = "block",
    max_gathered_bytes: int | None = None,
) -> list[nn.Module]:
    """``fully_shard`` every unit (each transformer block, or each projection of every block), then each
    Hugging Face model as a root.

    The blocks are found by class name: ``layer_classes`` or the model's ``_no_split_modules``
    (``LlamaDecoderLayer`` ...). ``unit``: ``"block"``, ``"projection"`` or ``"auto"``, the largest whose
    gathered parameters fit ``max_gathered_bytes`` or a share of the device's memory
    (:func:`~lomo_lightning.strategies.fsdp_units.choose_unit`). The units prefetch their successors
    (:func:`~lomo_lightning.strategies.fsdp_units.set_prefetching`). Returns the sharded roots.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    quantized = [name for name, p in module.named_parameters() if is_quantized(p)]
    if quantized:
        raise ValueError(f"strategy='lomo_fsdp' cannot shard quantized weights ({quantized[0]}): train a quantized base on one process")
    roots = transformer_roots(module)
    if not roots:
        raise TypeError(
            f"strategy='lomo_fsdp' shards Hugging Face models by itself, but found none in {type(module).__name__}. "
            "Override configure_model() and apply fully_shard there (per block, then the root)."
        )
    mp_policy = mp_policy or MixedPrecisionPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp_policy, ignored_params=replicated_parameters(module))
    budget = gathered_budget(torch.device(mesh.device_type), max_gathered_bytes) if unit == "auto" else 0
    for root in roots:
        names = set(layer_classes or getattr(root, "_no_split_modules", None) or ())
        blocks = [m for m in root.modules() if type(m).__name__ in names]
        if not blocks:
            raise ValueError(
                f"No transformer block of {type(root).__name__} matches {sorted(names)}: pass layer_classes=[...]."
            )
        chosen = choose_unit(blocks, unit, budget, mp_policy.param_dtype)
        units = units_of(blocks, chosen)
        for each in units:
            fully_shard(each, reshard_after_forward=reshard_after_forward, **kwargs)
        set_prefetching(units, chosen)
        rank_zero_info(f"lomo_lightning: FSDP2 unit of {type(root).__name__}: a {chosen} ({len(units)} units)")
        # the root's parameters (embeddings, final norm, head) are gathered for the whole forward anyway
        fully_shard(root, reshard_after_forward=False, **kwargs)
    sharded = {id(p) for root in roots for p in root.parameters()}
    outside = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in sharded]
    if outside:
        raise ValueError(
            f"Trainable parameters outside the Hugging Face model would stay unsharded and unsynchronized: "
            f"{outside[:5]}. Shard them yourself in configure_model()."
        )
    return roots


def replicated_parameters(module: nn.Module) -> set[nn.Parameter]:
    """The parameters to leave out of ``fully_shard``: sparse fine-tuning's values (small, whole on every rank)."""
    return {m.values for m in module.modules() if isinstance(m, SparseDeltaLinear)}


def is_fully_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 for Hugging Face models without writing ``configure_model`` (``Trainer(strategy="lomo_fsdp_unfused")``).

    Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` with a 1-D mesh over all ranks,
    which also shards the model itself: unless ``configure_model()`` already applied ``fully_shard``,
    every transformer block and then each Hugging Face model is sharded (:func:`shard_transformers`).
    It is the unfused baseline of :class:`LomoFSDPStrategy` (``method=adamw strategy=fsdp`` in the app), so
    the two compare like with like; Lightning's ``strategy="fsdp"`` is FSDP1.

    Args:
        mp_policy: FSDP2 ``MixedPrecisionPolicy``; by default, ``precision="bf16-mixed"`` means
            bf16 parameters in forward/backward, fp32 gradient reduction and fp32 sharded master weights.
        layer_classes: class names of the blocks to shard (default: the model's ``_no_split_modules``).
        unit: what one FSDP2 unit gathers: ``"block"``, ``"projection"`` (each weight matrix of a block), or
            ``"auto"`` (default): the largest that fits ``max_gathered_bytes``
            (:mod:`~lomo_lightning.strategies.fsdp_units`).
        max_gathered_bytes: the budget of ``"auto"`` for the parameters gathered at once (the unit at work and
            the prefetched ones); default 8% of the device's memory.
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3).
        save_distributed_checkpoint: one shard file per rank (``True``) or a full checkpoint on rank 0.
    """

    strategy_name = "lomo_fsdp_unfused"  # not "fsdp2": Lightning registers its own FSDP2Strategy under it
    description = "FSDP2 (fully_shard) over all ranks, sharding Hugging Face models by their blocks"

    def __init__(
        self,
        mp_policy: Any = None,
        layer_classes: Iterable[str] | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        unit: str = "auto",
        max_gathered_bytes: int | None = None,
    ):
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.mp_policy = mp_policy
        self.layer_classes = list(layer_classes) if layer_classes is not None else None
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.unit = unit
        self.max_gathered_bytes = max_gathered_bytes
        self.reshard_after_forward = reshard_after_forward

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        register_own_name(cls, strategy_registry)

    @override
    def setup_environment(self) -> None:
        # ModelParallelStrategy.setup_environment with one FSDP dimension over every rank of every node, which
        # AdaLomo's statistics reduce over, in place of its (data, tensor) mesh
        assert self.accelerator is not None
        self.accelerator.setup_device(self.root_device)
        self._setup_distributed()
        from torch.distributed.device_mesh import init_device_mesh

        self._device_mesh = init_device_mesh(self.root_device.type, (self.world_size,), mesh_dim_names=("data_parallel",))
        assert self.lightning_module is not None
        set_device_mesh(self.lightning_module, self._device_mesh)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def setup(self, trainer: Trainer) -> None:
        # ModelParallelStrategy.setup (a copy: tests/test_strategy.py fails when Lightning's changes), with the
        # sharding of a model whose configure_model() did not shard it in place of its refusal
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if not is_fully_sharded(self.model):
            shard_transformers(
                self.model,
                self.device_mesh,
                layer_classes=self.layer_classes,
                mp_policy=self._mixed_precision_policy(),
                reshard_after_forward=self.reshard_after_forward,
                unit=self.unit,
                max_gathered_bytes=self.max_gathered_bytes,
            )
        materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    def _mixed_precision_policy(self) -> Any:
        if self.mp_policy is not None:
            return self.mp_policy
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = self.precision_plugin
        if isinstance(precision, MixedPrecision) and precision.precision == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save as Lightning does; a distributed checkpoint is written beside ``filepath``, then renamed into place.

        Every rank writes its shard file into the staging directory; once all are written, rank zero
        renames the directory, so a kill at any moment leaves the previous checkpoint whole. (A full
        checkpoint is one file: the ``CheckpointIO``, e.g. :class:`~lomo_lightning.checkpointing.AtomicCheckpointIO`,
        writes it.)
        """
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        staging = staging_path(path)
        if self.is_global_zero:
            remove_entry(staging)  # left by a process killed while writing it (a link: removed, not followed)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options=storage_options)
        self.barrier()
        if self.is_global_zero:
            write_metadata_digest(staging)  # checked before loading: torch unpickles .metadata
            publish_directory(staging, path)
        self.barrier()


    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load as Lightning does, after checking a distributed checkpoint's ``.metadata`` against its saved digest."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            check_metadata_digest(path)
        return super().load_checkpoint(path, weights_only=weights_only)


class LomoFSDPStrategy(FusedStrategy, FSDP2Strategy):
    """Fused updates on FSDP2 shards (``Trainer(strategy="lomo_fsdp")``), on one or more nodes.

    Each rank holds 1/world of every sharded parameter and of its AdaLomo statistics; a
    parameter's gradient exists only as the local shard, only until the rule has consumed it.
    The model is sharded as :class:`FSDP2Strategy` shards it.

    Args:
        clip_grad_norm: global-norm clipping (two backward passes, norm all-reduced over shards).
        clip_grad_value: value clipping.
        **kwargs: :class:`FSDP2Strategy`'s (``unit``, ``max_gathered_bytes``, ``mp_policy``, ``layer_classes``,
            ``reshard_after_forward``, ``save_distributed_checkpoint``, ...).
    """

    strategy_name = "lomo_fsdp"
    description = "Fused updates on FSDP2 shards, after each reduce-scatter"

    def __init__(self, clip_grad_norm: float | None = None, clip_grad_value: float | None = None, **kwargs: Any):
        super().__init__(clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, **kwargs)

    @override
    def make_fused_updater(self, optimizer: Optimizer, **kwargs: Any) -> FusedUpdater:
        assert self.lightning_module is not None
        return ShardedFusedUpdater(self.lightning_module, optimizer, group=self.device_mesh.get_group(), **kwargs)


def save_pretrained_consolidated(trainer_or_module: Trainer | LightningModule | nn.Module, directory: str | os.PathLike) -> None:
    """Export the Hugging Face model as one ordinary ``save_pretrained`` folder, from shards or replicas.

    Call it on every rank (it gathers): the full state dict is assembled on rank 0, moved to CPU, and
    written by rank 0 alone; the other ranks wait.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = trainer_or_module.lightning_module if isinstance(trainer_or_module, Trainer) else trainer_or_module
    roots = transformer_roots(module)
    if len(roots) != 1:
        raise ValueError(f"save_pretrained_consolidated needs exactly one Hugging Face model in the module, found {len(roots)}.")
    model = cast("PreTrainedModel", roots[0])
    distributed = dist.is_available() and dist.is_initialized()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = cast("dict[str, Tensor]", get_model_state_dict(model, options=options))  # a model's: its parameters and buffers
    if not distributed or dist.get_rank() == 0:
        state = merge_sparse_deltas(model, state)  # a plain Hugging Face model: W0 + delta in each weight
        model.save_pretrained(directory, state_dict=state)
    if distributed:
        dist.barrier()
