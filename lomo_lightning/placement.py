"""Placements: where the fused engine's parameters live, and what that place adds to a step.

:class:`OneDevice` (every parameter whole), :class:`Replicas` (DDP: gradients averaged in DDP's buckets)
and :class:`Shards` (FSDP2: parameters sharded on dim 0). A placement answers the engine's questions
(when a gradient is final and what completes it, what completes the global norm and the skip verdict,
which split steps share a collective) and completes what the engine deferred to it; it never calls the
engine back. It knows no selection: what must stay whole is handed to it (``Shards(group, replicated=...)``).
The per-tensor helpers it builds on live in :mod:`lomo_lightning.layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lomo_lightning._compat import rearm_ddp_reducer
from lomo_lightning.layout import is_distributed, shard_group
from lomo_lightning.optim.base import finish_update

# A gradient's completion by the placement: (gradient, measuring) -> the final gradient, or None when this
# process has nothing to count for it.
Completion = Callable[[Tensor, bool], "Tensor | None"]


@dataclass(frozen=True, eq=False)
class Batch:
    """Split steps whose partial sums one collective completes: the parameters of one FSDP unit.

    ``closes``: the unit's last parameter, whose hook runs the collective.
    """

    unit: nn.Module
    group: Any
    closes: bool = False


class Placement:
    """Where the parameters live, as the fused engine (:class:`~lomo_lightning.FusedUpdater`) sees it.

    What is fixed per parameter is asked once, when the engine attaches: :meth:`completion` (what makes
    a gradient final) and :meth:`batch_of` (which split steps share one collective). Per step the engine
    asks :meth:`all_finite` (no norm pass) or :meth:`complete_norm` (with a norm pass, the skip verdict
    riding in the same reduction), hands deferred updates to :meth:`defer`, and ends each backward pass
    with :meth:`end_of_pass`. This base class is one device: gradients are final in their
    post-accumulate-grad hooks, and every answer is local.
    """

    installs_hooks = True  # False: gradients reach the engine another way (DDP's communication hook)

    def attach(self, model: nn.Module, parameters: list[Tensor], split_steps: bool) -> None:
        """The engine's trainable ``parameters`` are known, or changed (a selection re-sampled them).

        ``split_steps``: the rule can split its step around a collective (``SplitStepRule``).
        """

    def completion(self, param: Tensor) -> Completion | None:
        """What completes ``param``'s gradient before the engine consumes it; ``None``: final as it comes."""
        return None

    def batch_of(self, param: Tensor) -> Batch | None:
        """The batch whose collective completes ``param``'s split step (:meth:`defer`); ``None``: its own."""
        return None

    def all_finite(self, loss: Tensor) -> bool:
        """Whether every process's loss is finite (asked when no norm pass runs)."""
        return bool(torch.isfinite(loss).all())

    def complete_norm(self, stats: Tensor) -> Tensor:
        """Complete ``[squared gradient norm, 1 if the loss is not finite]`` of this process over the placement."""
        return stats

    def defer(self, batch: Batch, update: Generator[Tensor, Tensor, None], partial: Tensor) -> None:
        """Finish a split update once its batch's partial sums are complete (see :meth:`batch_of`)."""
        raise NotImplementedError(f"{type(self).__name__} batches no split steps")

    def end_of_pass(self, measuring: bool) -> None:
        """After each backward pass (the norm-measuring one too): complete what was deferred."""


class OneDevice(Placement):
    """Every parameter whole, on one device (the default)."""


def all_ranks_finite(loss: Tensor, group: dist.ProcessGroup | None) -> bool:
    """``True`` only if the loss is finite on every rank: one rank skipping backward alone would hang the rest."""
    flag = torch.isfinite(loss).all().to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class Replicas(Placement):
    """DDP replicas: each gradient is final once its bucket is all-reduced, in DDP's communication hook.

    The engine for DDP (:class:`~lomo_lightning.strategies.ddp.ReplicatedFusedUpdater`) registers that
    hook; with ``gradient_as_bucket_view=True`` no other gradient memory exists. Every rank computes the
    same global norm; the skip verdict is agreed by all ranks.
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

    def attach(self, model: nn.Module, parameters: list[Tensor], split_steps: bool) -> None:
        if set(parameters) != self.reduced:
            raise NotImplementedError(
                "The trainable parameters changed after DistributedDataParallel wrapped the model (HFT resampling "
                "mid-training?). DDP only all-reduces the set it was built with. Apply the selection before fit, or "
                "resample under strategy='lomo_fsdp' or 'lomo'."
            )

    def all_finite(self, loss: Tensor) -> bool:
        return all_ranks_finite(loss, self.group)

    def complete_norm(self, stats: Tensor) -> Tensor:
        # every rank holds the same averaged gradients, hence the same norm: MAX keeps it and spreads the flag
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self.group)
        return stats

    def end_of_pass(self, measuring: bool) -> None:
        if measuring:
            rearm_ddp_reducer(self.ddp)  # DDP expects one backward per forward: re-arm it for the updating pass


class Shards(Placement):
    """FSDP2 shards: each gradient is final, reduce-scattered, in the post-accumulate-grad hook of its shard.

    The squared gradient norm is summed over the ranks and the skip verdict agreed. The ``replicated``
    parameters (left out of ``fully_shard``: sparse fine-tuning's values) are whole on every rank: their
    gradients are averaged over ``group`` (one all-reduce each) before the rule runs, and their norm counts once.

    Split steps (:class:`~lomo_lightning.optim.base.SplitStepRule`, AdaLomo) are batched over an FSDP unit:
    each parameter's partial sums are computed as its hook runs; after the unit's last hook one all-reduce
    completes all of them and every update finishes. One collective per unit instead of one per parameter:
    on gloo each blocking collective costs milliseconds. The unit's gradients are views of one
    reduce-scatter buffer, so holding them until its last hook costs no memory.
    """

    def __init__(self, group: Any = None, replicated: Iterable[Tensor] = ()):
        self.group = group
        self.replicated = set(replicated)
        self._trainable_replicas: set[Tensor] = set()
        self._batches: dict[Tensor, Batch] = {}
        self._pending: list[tuple[Generator[Tensor, Tensor, None], Tensor]] = []
        self._pending_batch: Batch | None = None

    def attach(self, model: nn.Module, parameters: list[Tensor], split_steps: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        sharded = [name for name, p in model.named_parameters() if p in self.replicated and is_distributed(p)]
        if sharded:
            raise ValueError(
                f"{sharded[0]} must stay whole on every rank but was sharded by fully_shard: keep it replicated, "
                "fully_shard(module, ..., ignored_params=replicated_parameters(model))."
            )
        trainable = set(parameters)
        self._trainable_replicas = {p for p in trainable if not is_distributed(p)}
        self._pending = []
        # Each FSDP unit (a fully_shard-ed module) owns the parameters not owned by a unit inside it; FSDP2
        # runs their hooks one after another after the unit's reduce-scatter, in registration order.
        unit_of: dict[Tensor, nn.Module] = {}
        for module in model.modules():  # outer units first: inner ones take their parameters over
            if isinstance(module, FSDPModule):
                unit_of.update({p: module for p in module.parameters() if p in trainable})
        self._batches = {}
        if split_steps:
            last_of_unit = {unit: param for param, unit in unit_of.items()}  # registration order: the last one stays
            for param, unit in unit_of.items():
                group = shard_group(param)
                if group is not None:
                    self._batches[param] = Batch(unit, group, closes=last_of_unit[unit] is param)

    def completion(self, param: Tensor) -> Completion | None:
        return self._average_replica if param in self._trainable_replicas else None

    def batch_of(self, param: Tensor) -> Batch | None:
        return self._batches.get(param)

    def all_finite(self, loss: Tensor) -> bool:
        return all_ranks_finite(loss, self.group)

    def complete_norm(self, stats: Tensor) -> Tensor:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        return stats

    def _average_replica(self, grad: Tensor, measuring: bool) -> Tensor | None:
        """A replicated parameter's gradient averaged over the ranks; shards arrive reduced already."""
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)
        grad.div_(dist.get_world_size(self.group))
        if measuring and dist.get_rank(self.group) != 0:
            return None  # the norms are summed over ranks: a replica's counts once
        return grad

    def defer(self, batch: Batch, update: Generator[Tensor, Tensor, None], partial: Tensor) -> None:
        pending = self._pending_batch
        if self._pending and pending is not None and (batch.unit is not pending.unit or batch.group is not pending.group):
            self._complete_pending()
        self._pending.append((update, partial))
        self._pending_batch = batch
        if batch.closes:
            self._complete_pending()

    def end_of_pass(self, measuring: bool) -> None:
        self._complete_pending()  # a unit whose last parameter got no gradient this step

    @torch.no_grad()
    def _complete_pending(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        assert self._pending_batch is not None
        sums = torch.cat([partial for _, partial in pending])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self._pending_batch.group)
        for (update, _), summed in zip(pending, sums.split([partial.numel() for _, partial in pending])):
            finish_update(update, summed)
