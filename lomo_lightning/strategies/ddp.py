"""strategy="lomo_ddp": fused updates on DDP replicas.

A parameter's post-accumulate-grad hook fires before DDP has averaged its gradient, so under DDP the
update runs from a communication hook instead: each bucket is all-reduced, and the future's callback
feeds every parameter of the bucket its averaged gradient (a view of the bucket), then zeroes the bucket.
With ``gradient_as_bucket_view=True`` the gradients *are* the bucket views, so the gradient memory is
DDP's bucket memory and nothing more; the zeroed views let the next backward accumulate in place.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lomo_lightning.fused import FusedUpdater
from lomo_lightning.placement import Replicas
from lomo_lightning.strategies.base import FusedStrategy


class ReplicatedFusedUpdater(FusedUpdater):
    """The engine on DDP replicas (:class:`~lomo_lightning.placement.Replicas`): gradients arrive already
    averaged, from DDP's communication hook.

    Usable without Lightning: ``ReplicatedFusedUpdater(DistributedDataParallel(model, gradient_as_bucket_view=True), optimizer)``,
    then ``updater.backward(ddp_model(**batch).loss)``.

    Global-norm clipping takes the norm of the averaged gradients in a first backward pass, exactly as
    on one device; every rank computes the same norm. The skip verdict (non-finite loss) is agreed by all ranks.
    """

    def __init__(self, ddp_model: DistributedDataParallel, optimizer: Optimizer, **kwargs: Any):
        super().__init__(ddp_model.module, optimizer, placement=Replicas(ddp_model), **kwargs)
        ddp_model.register_comm_hook(state=self, hook=allreduce_then_update)


def allreduce_then_update(engine, bucket):
    """DDP communication hook: average the bucket, then update (or measure) each of its parameters.

    (Unannotated: DDP checks the annotations by identity, which postponed annotations would fail.)
    """
    placement = engine.placement
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(placement.group))
    reduced = dist.all_reduce(buffer, group=placement.group, async_op=True).get_future()
    trainable = placement.reduced  # the engine's trainable set (Replicas.attach checks)

    def update(future):
        averaged = future.value()[0]
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            if param in trainable:
                engine.apply_gradient(param, grad)
        return averaged.zero_()

    return reduced.then(update)


class LomoDDPStrategy(FusedStrategy, DDPStrategy):
    """Fused updates on DDP replicas (``Trainer(strategy="lomo_ddp")``), on one or more nodes.

    Every rank holds the full parameters and optimizer state, plus DDP's gradient buckets (one
    parameter-sized buffer, in which the gradients live as views); there is no per-parameter gradient
    beyond that.

    Args:
        clip_grad_norm: global-norm clipping (two backward passes over the averaged gradients).
        clip_grad_value: value clipping.
        **kwargs: passed to ``DDPStrategy`` (``bucket_cap_mb``, ``find_unused_parameters``, ...);
            ``gradient_as_bucket_view`` is always ``True`` and the communication hook is the engine's.
    """

    strategy_name = "lomo_ddp"
    description = "Fused updates on DDP replicas, after each bucket's all-reduce"

    def __init__(self, clip_grad_norm: float | None = None, clip_grad_value: float | None = None, **kwargs: Any):
        if kwargs.get("gradient_as_bucket_view") is False:
            raise ValueError("strategy='lomo_ddp' needs gradient_as_bucket_view=True (gradients live in DDP's buckets).")
        if kwargs.get("ddp_comm_hook") is not None:
            raise ValueError("strategy='lomo_ddp' installs its own communication hook: it runs the fused update.")
        kwargs["gradient_as_bucket_view"] = True
        super().__init__(clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, **kwargs)

    @override
    def make_fused_updater(self, optimizer: Optimizer, **kwargs: Any) -> FusedUpdater:
        if not isinstance(self.model, DistributedDataParallel):
            raise RuntimeError(f"strategy='lomo_ddp' expected the model wrapped in DistributedDataParallel, got {type(self.model)}.")
        return ReplicatedFusedUpdater(self.model, optimizer, **kwargs)
