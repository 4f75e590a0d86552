"""What a shard or a replica needs: shard groups, local tensors, the reductions that complete whole-tensor sums.

Under FSDP2 a parameter is a ``DTensor`` sharded on dim 0 over a 1-D mesh; elementwise work runs on its
local shard, and a statistic that spans the whole tensor (a norm, a column mean, an RMS) is completed
here, by one all-reduce over the shard group, and nowhere else. Under DDP a parameter is whole on every
rank; what must agree over ranks (the skip verdict) is agreed here too.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from lomo_lightning.fused import FusedUpdater


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (FSDP2), or the tensor itself: elementwise work needs no DTensor dispatch."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_group(tensor: Tensor) -> Any:
    """The process group a ``DTensor`` is sharded over on dim 0 (FSDP2); ``None`` when whole or replicated.

    Raises ``NotImplementedError`` for placements the per-shard code here cannot complete exactly
    (several mesh dimensions, sharding on another dimension).
    """
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh = cast("DTensor", tensor).device_mesh  # it has placements: a DTensor
    if mesh.ndim != 1 or not all(isinstance(p, (Shard, Replicate)) for p in placements):
        raise NotImplementedError(f"lomo_lightning supports 1-D meshes with Shard(0) or Replicate placement, got {placements}.")
    if not isinstance(placements[0], Shard):
        return None
    if placements[0].dim != 0:
        raise NotImplementedError(f"lomo_lightning needs tensors sharded on dim 0 (FSDP2's default), got {placements}.")
    return mesh.get_group()


def flat_offset(tensor: Tensor) -> int:
    """The position of a ``DTensor`` shard's first element in the flattened whole tensor (0 when whole)."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(tensor.shape, cast("DTensor", tensor).device_mesh, placements)
    strides = [math.prod(tensor.shape[d + 1 :]) for d in range(tensor.dim())]
    return sum(o * s for o, s in zip(offsets, strides))


def all_ranks_finite(loss: Tensor, group: dist.ProcessGroup | None) -> bool:
    """``True`` only if the loss is finite on every rank: one rank skipping backward alone would hang the rest."""
    flag = torch.isfinite(loss).all().to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


@dataclass(frozen=True)
class ShardLayout:
    """Where statistics that span a whole tensor are completed.

    A plain tensor is whole (``group is None``). An FSDP2 parameter is a ``DTensor`` sharded on dim 0:
    its local rows are complete rows, so row statistics stay local. The column statistics are sharded
    too, by chunks of columns (``torch.chunk``, as ``DTensor`` places ``Shard(0)``); the column sums,
    the chunks and the scalar sums behind a mean or an RMS travel in one all-reduce per tensor.
    """

    group: Any = None
    rows: int = 0
    numel: int = 0

    @staticmethod
    def of(param: Tensor) -> ShardLayout:
        return ShardLayout(shard_group(param), param.shape[0] if param.dim() else 1, param.numel())

    @staticmethod
    def like_rows(local_state: Tensor, param: Tensor) -> Tensor:
        """Per-row state of ``param``, placed like its rows: a ``DTensor`` for a ``DTensor`` parameter.

        Distributed checkpoints then save each rank's rows once and can reshard them; a plain tensor
        would be taken for a replica and saved from rank 0 only.
        """
        placements = getattr(param, "placements", None)
        if placements is None:
            return local_state
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local_state,
            cast(DTensor, param).device_mesh,
            placements,
            run_check=False,
            shape=torch.Size((param.shape[0],)),
            stride=(1,),
        )

    def columns(self, cols: int) -> slice:
        """The chunk of ``cols`` columns whose statistics this rank keeps (all of them when whole)."""
        if self.group is None:
            return slice(0, cols)
        chunk = math.ceil(cols / dist.get_world_size(self.group))
        start = min(dist.get_rank(self.group) * chunk, cols)
        return slice(start, min(start + chunk, cols))

    def column_chunk(self, whole_state: Tensor, param: Tensor) -> Tensor:
        """Per-column state of ``param``: whole for a plain tensor, this rank's chunk as a ``DTensor`` on shards."""
        if self.group is None:
            return whole_state
        from torch.distributed.tensor import DTensor, Shard

        cols = whole_state.numel()
        return DTensor.from_local(
            whole_state[self.columns(cols)].clone(),
            cast(DTensor, param).device_mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size((cols,)),
            stride=(1,),
        )

    def sum_(self, tensor: Tensor) -> Tensor:
        """Complete a partial sum over the shard group, in place."""
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


# -- placements: what the fused engine asks of the place its parameters live ---------------------------


class Placement:
    """Where the parameters live, as the fused engine (:class:`~lomo_lightning.FusedUpdater`) sees it.

    The engine asks a placement when a gradient is final and what it is (:meth:`final_gradient`), what
    completes the global norm (:meth:`reduce_squared_norm`) and the skip verdict (:meth:`all_finite`), and
    lets it run or defer each update (:meth:`step`, completed by :meth:`end_of_pass`). This base class is
    one device: gradients are final in their post-accumulate-grad hooks, and every answer is local.
    """

    installs_hooks = True  # False: the placement feeds engine.apply_gradient itself (DDP's communication hook)

    def attach(self, engine: FusedUpdater) -> None:
        """The engine's trainable parameters are known, or changed (a selection re-sampled them)."""

    def all_finite(self, loss: Tensor) -> bool:
        return bool(torch.isfinite(loss).all())

    def reduce_squared_norm(self, squared_norm: Tensor) -> Tensor:
        """Complete the squared gradient norm of this process's gradients over the placement."""
        return squared_norm

    def final_gradient(self, param: Tensor, grad: Tensor, measuring: bool) -> Tensor | None:
        """The gradient the engine consumes for ``param``; ``None``: nothing for this process to count."""
        return grad

    def step(self, engine: FusedUpdater, param: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """Update ``param`` now, or defer it until :meth:`end_of_pass`."""
        engine.step_parameter(param, grad, group)

    def end_of_pass(self, engine: FusedUpdater, measuring: bool) -> None:
        """After each backward pass (the norm-measuring one too): complete what was deferred."""


class OneDevice(Placement):
    """Every parameter whole, on one device (the default)."""


class Replicas(Placement):
    """DDP replicas: each gradient is final once its bucket is all-reduced, in DDP's communication hook.

    The hook (:func:`allreduce_then_update`) feeds the engine each parameter's averaged gradient, a view of
    the bucket; with ``gradient_as_bucket_view=True`` no other gradient memory exists. Every rank computes
    the same global norm; the skip verdict is agreed by all ranks.
    """

    installs_hooks = False

    def __init__(self, ddp_model: Any):
        if not ddp_model.gradient_as_bucket_view:
            raise ValueError(
                "Fused updates under DDP need DistributedDataParallel(..., gradient_as_bucket_view=True): otherwise "
                "every parameter keeps a full gradient next to DDP's buckets."
            )
        self.ddp = ddp_model
        self.group = ddp_model.process_group
        # DDP's reducer all-reduces exactly the parameters that required grad when it was built
        self.reduced = {p for p in ddp_model.module.parameters() if p.requires_grad}
        self._hooked = False

    def attach(self, engine: FusedUpdater) -> None:
        if set(engine.parameters) != self.reduced:
            raise NotImplementedError(
                "The trainable parameters changed after DistributedDataParallel wrapped the model (HFT resampling "
                "mid-training?). DDP only all-reduces the set it was built with. Apply the selection before fit, or "
                "resample under strategy='lomo_fsdp' or 'lomo'."
            )
        if not self._hooked:
            self.ddp.register_comm_hook(state=engine, hook=allreduce_then_update)
            self._hooked = True

    def all_finite(self, loss: Tensor) -> bool:
        return all_ranks_finite(loss, self.group)

    def end_of_pass(self, engine: FusedUpdater, measuring: bool) -> None:
        if measuring:
            # DDP expects one backward per forward: re-arm its reducer for the second (updating) pass. On the
            # first iteration it has recorded the ready order to rebuild its buckets by: rebuild them now,
            # before the second pass records the same parameters again.
            self.ddp.reducer._rebuild_buckets()
            self.ddp.reducer.prepare_for_backward([])


def allreduce_then_update(engine, bucket):
    """DDP communication hook: average the bucket, then update (or measure) each of its parameters.

    (Unannotated: DDP checks the annotations by identity, which postponed annotations would fail.)
    """
    group = engine.placement.group
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(group))
    reduced = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    trainable = engine.placement.reduced  # the engine's trainable set (Replicas.attach checks)

    def update(future):
        averaged = future.value()[0]
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            if param in trainable:
                engine.apply_gradient(param, grad)
        return averaged.zero_()

    return reduced.then(update)


class Shards(Placement):
    """FSDP2 shards: each gradient is final, reduce-scattered, in the post-accumulate-grad hook of its shard.

    The squared gradient norm is summed over the ranks and the skip verdict agreed. Parameters left out
    of ``fully_shard`` (sparse fine-tuning's values) are whole on every rank: their gradients are
    averaged over ``group`` (one all-reduce each) before the rule runs, and their norm counts once.

    Rules that split their step (:class:`~lomo_lightning.optim.base.SplitStepRule`, AdaLomo) are batched
    over an FSDP unit: each parameter's partial sums are computed as its hook runs; after the unit's last
    hook one all-reduce completes all of them and every update finishes. One collective per unit
    instead of one per parameter: on gloo each blocking collective costs milliseconds. The unit's
    gradients are views of one reduce-scatter buffer, so holding them until its last hook costs no memory.
    """

    def __init__(self, group: Any = None):
        self.group = group
        self._replicated: set[Tensor] = set()
        self._batched: dict[Tensor, tuple[nn.Module, Any]] = {}  # parameter -> its FSDP unit and shard group
        self._last_of_unit: dict[nn.Module, Tensor] = {}
        self._pending: list[tuple[Generator[Tensor, Tensor, None], Tensor]] = []
        self._pending_unit: nn.Module | None = None
        self._pending_group: Any = None

    def attach(self, engine: FusedUpdater) -> None:
        from torch.distributed.fsdp import FSDPModule

        from lomo_lightning.optim.base import SplitStepRule
        from lomo_lightning.selection.sft import SparseDeltaLinear

        sharded_values = [
            name for name, m in engine.model.named_modules() if isinstance(m, SparseDeltaLinear) and hasattr(m.values, "placements")
        ]
        if sharded_values:
            raise ValueError(
                f"The sparse values of {sharded_values[0]} were sharded by fully_shard: keep them replicated, "
                "fully_shard(module, ..., ignored_params=replicated_parameters(model))."
            )
        trainable = set(engine.parameters)
        self._replicated = {p for p in trainable if not hasattr(p, "placements")}
        self._pending = []
        # Each FSDP unit (a fully_shard-ed module) owns the parameters not owned by a unit inside it; FSDP2
        # runs their hooks one after another after the unit's reduce-scatter, in registration order.
        unit_of: dict[Tensor, nn.Module] = {}
        for module in engine.model.modules():  # outer units first: inner ones take their parameters over
            if isinstance(module, FSDPModule):
                unit_of.update({p: module for p in module.parameters() if p in trainable})
        splits = isinstance(engine.optimizer, SplitStepRule)
        self._batched = {p: (unit, shard_group(p)) for p, unit in unit_of.items() if splits and shard_group(p) is not None}
        self._last_of_unit = {}
        for param, (unit, _) in self._batched.items():
            self._last_of_unit[unit] = param  # dict order is registration order: the last one stays

    def all_finite(self, loss: Tensor) -> bool:
        return all_ranks_finite(loss, self.group)

    def reduce_squared_norm(self, squared_norm: Tensor) -> Tensor:
        dist.all_reduce(squared_norm, op=dist.ReduceOp.SUM, group=self.group)
        return squared_norm

    def final_gradient(self, param: Tensor, grad: Tensor, measuring: bool) -> Tensor | None:
        """A replicated parameter's gradient averaged over the ranks; shards arrive reduced already."""
        if param in self._replicated:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)
            grad.div_(dist.get_world_size(self.group))
            if measuring and dist.get_rank(self.group) != 0:
                return None  # the norms are summed over ranks: a replica's counts once
        return grad

    def step(self, engine: FusedUpdater, param: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        batched = self._batched.get(param)
        if batched is None:
            engine.step_parameter(param, grad, group)
            return
        unit, group_of_shards = batched
        if self._pending and (unit is not self._pending_unit or group_of_shards is not self._pending_group):
            self._complete_pending()
        update = engine.optimizer.begin_step_parameter(param, grad, group, grad_is_scratch=True)  # type: ignore[attr-defined]
        self._pending.append((update, next(update)))
        self._pending_unit, self._pending_group = unit, group_of_shards
        if param is self._last_of_unit.get(unit):
            self._complete_pending()

    def end_of_pass(self, engine: FusedUpdater, measuring: bool) -> None:
        self._complete_pending()  # a unit whose last parameter got no gradient this step

    @torch.no_grad()
    def _complete_pending(self) -> None:
        from lomo_lightning.optim.base import finish_update

        pending, self._pending = self._pending, []
        if not pending:
            return
        sums = torch.cat([partial for _, partial in pending])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self._pending_group)
        for (update, _), summed in zip(pending, sums.split([partial.numel() for _, partial in pending])):
            finish_update(update, summed)
