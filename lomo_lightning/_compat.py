"""Every private API of an upstream library that the package relies on, in one place.

Each function names the upstream object it reaches into and the versions it was checked against
(torch 2.13); ``tests/test_compat.py`` fails when an upstream release removes or
changes one, so that a break shows here and not deep inside training. Upstream imports are deferred
to the call: this module is a leaf that AdaLomo (torch alone) imports too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim import Optimizer


def local_shard_offsets(tensor: DTensor) -> tuple[int, ...]:
    """The global index of a ``DTensor`` shard's first element along each dimension.

    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` (private; torch >= 2.4).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(offsets)


def mark_optimizer_stepped(optimizer: Optimizer) -> None:
    """Record what a wrapped ``optimizer.step()`` records, so LR schedulers do not warn of a skipped step.

    ``torch.optim.Optimizer._opt_called`` (private; read by ``torch.optim.lr_scheduler.LRScheduler``).
    """
    optimizer._opt_called = True  # type: ignore[attr-defined]


def rearm_ddp_reducer(ddp_model: DistributedDataParallel) -> None:
    """Let a DDP model run a second backward for the same forward (the fused engine's norm pass).

    ``DistributedDataParallel.reducer._rebuild_buckets`` (private) and ``reducer.prepare_for_backward``.
    On the first iteration DDP has recorded the ready order to rebuild its buckets by: rebuild them now,
    before the second pass records the same parameters again.
    """
    ddp_model.reducer._rebuild_buckets()
    ddp_model.reducer.prepare_for_backward([])

