"""strategy="lomo_ddp": fused updates on DDP replicas.

A parameter's post-accumulate-grad hook fires before DDP has averaged its gradient, so under DDP the
update runs from a communication hook instead: each bucket is all-reduced, and the future's callback
feeds every parameter of the bucket its averaged gradient (a view of the bucket), then zeroes the bucket.
With ``gradient_as_bucket_view=True`` the gradients *are* the bucket views, so the gradient memory is
DDP's bucket memory and nothing more; the zeroed views let the next backward accumulate in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lomo_lightning.fused import FusedUpdater
from lomo_lightning.strategies.base import FusedStrategyMixin
from lomo_lightning.strategies.fsdp import all_ranks_finite


class ReplicatedFusedUpdater(FusedUpdater):
    """The engine on DDP replicas: gradients arrive already averaged, from DDP's communication hook.

    Usable without Lightning: ``ReplicatedFusedUpdater(DistributedDataParallel(model, gradient_as_bucket_view=True), optimizer)``,
    then ``updater.backward(ddp_model(**batch).loss)``.

    Global-norm clipping takes the norm of the averaged gradients in a first backward pass, exactly as
    on one device; every rank computes the same norm. The skip verdict (non-finite loss) is agreed by all ranks.
    """

    def __init__(self, ddp_model: DistributedDataParallel, optimizer: Optimizer, **kwargs: Any):
        if not ddp_model.gradient_as_bucket_view:
            raise ValueError(
                "Fused updates under DDP need DistributedDataParallel(..., gradient_as_bucket_view=True): otherwise "
                "every parameter keeps a full gradient next to DDP's buckets."
            )
        self.ddp = ddp_model
        self.group = ddp_model.process_group
        # DDP's reducer all-reduces exactly the parameters that required grad when it was built
        self._reduced = {p for p in ddp_model.module.parameters() if p.requires_grad}
        super().__init__(ddp_model.module, optimizer, install_hooks=False, **kwargs)
        ddp_model.register_comm_hook(state=self, hook=_allreduce_then_update)

    def refresh(self, install_hooks: bool = False) -> None:
        """Follow the trainable set; under DDP it cannot change, because DDP's buckets cannot."""
        super().refresh(install_hooks=False)  # the communication hook, not autograd hooks, feeds the engine
        if set(self._trainable) != self._reduced:
            raise NotImplementedError(
                "The trainable parameters changed after DistributedDataParallel wrapped the model (HFT resampling "
                "mid-training?). DDP only all-reduces the set it was built with. Apply the selection before fit, or "
                "resample under strategy='lomo_fsdp' or 'lomo'."
            )

    def _measure_grad_norm(self, scaled_loss: Tensor) -> Tensor:
        norm = super()._measure_grad_norm(scaled_loss)
        # DDP expects one backward per forward: re-arm its reducer for the second (updating) pass. On the
        # first iteration it has recorded the ready order to rebuild its buckets by: rebuild them now,
        # before the second pass records the same parameters again.
        self.ddp.reducer._rebuild_buckets()
        self.ddp.reducer.prepare_for_backward([])
        return norm

    def loss_is_finite(self, loss: Tensor) -> bool:
        return all_ranks_finite(loss, self.group)


def _allreduce_then_update(updater, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: average the bucket, then update (or measure) each of its parameters.

    (Unannotated: DDP checks the annotations by identity, which postponed annotations would fail.)
    """
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(updater.group))
    reduced = dist.all_reduce(buffer, group=updater.group, async_op=True).get_future()

    def update(future):  # type: ignore[no-untyped-def]
        averaged = future.value()[0]
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            if param in updater._trainable:
                updater.apply_gradient(param, grad)
        return averaged.zero_()

    return reduced.then(update)


class LomoDDPStrategy(FusedStrategyMixin, DDPStrategy):
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

    def __init__(self, clip_grad_norm: float | None = None, clip_grad_value: float | None = None, **kwargs: Any):
        if kwargs.get("gradient_as_bucket_view") is False:
            raise ValueError("strategy='lomo_ddp' needs gradient_as_bucket_view=True (gradients live in DDP's buckets).")
        if kwargs.get("ddp_comm_hook") is not None:
            raise ValueError("strategy='lomo_ddp' installs its own communication hook: it runs the fused update.")
        kwargs["gradient_as_bucket_view"] = True
        super().__init__(**kwargs)
        self._init_fused(clip_grad_norm, clip_grad_value)

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        self._install_fused_updater(trainer)

    def _make_fused_updater(self, module: torch.nn.Module, optimizer: Optimizer, **kwargs: Any) -> FusedUpdater:
        if not isinstance(self.model, DistributedDataParallel):
            raise RuntimeError(f"strategy='lomo_ddp' expected the model wrapped in DistributedDataParallel, got {type(self.model)}.")
        return ReplicatedFusedUpdater(self.model, optimizer, **kwargs)
