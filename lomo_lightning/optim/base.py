"""What every rule here shares: ``step()`` is a loop over parameters calling ``step_parameter``."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class PerParameterOptimizer(Optimizer):
    """An optimizer whose step is separable per parameter.

    ``step()`` works unfused (``loss.backward(); optimizer.step()``); the fused engine calls
    :meth:`step_parameter` for one parameter at a time, inside backward, and lets it overwrite the gradient.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.step_parameter(param, param.grad, group)
        return loss

    def step_parameter(self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False) -> None:
        """Update ``param`` alone from ``grad`` with the hyper-parameters of ``group``.

        ``grad_is_scratch=True``: the caller owns ``grad`` and frees it right after, so it may be overwritten.

        A rule whose step needs sums over a whole sharded tensor may also offer
        ``begin_step_parameter(param, grad, group, *, grad_is_scratch)``: the same update as a generator
        that yields its partial sums once (a 1-D fp32 tensor) and finishes when sent them summed over
        :func:`shard_group` (:func:`finish_update`). The sharded engine then batches those collectives.
        """
        raise NotImplementedError


def shard_group(tensor: Tensor) -> Any:
    """The process group a ``DTensor`` is sharded over on dim 0 (FSDP2); ``None`` when whole or replicated.

    Raises ``NotImplementedError`` for placements the per-shard code here cannot complete exactly
    (several mesh dimensions, sharding on another dimension).
    """
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh = tensor.device_mesh
    if mesh.ndim != 1 or not all(isinstance(p, (Shard, Replicate)) for p in placements):
        raise NotImplementedError(f"lomo_lightning supports 1-D meshes with Shard(0) or Replicate placement, got {placements}.")
    if not isinstance(placements[0], Shard):
        return None
    if placements[0].dim != 0:
        raise NotImplementedError(f"lomo_lightning needs tensors sharded on dim 0 (FSDP2's default), got {placements}.")
    return mesh.get_group()


def finish_update(update: Generator[Tensor, Tensor, None], sums: Tensor) -> None:
    """Send a split update (``begin_step_parameter``) its partial sums completed over the shard group."""
    try:
        update.send(sums)
    except StopIteration:
        return
    raise RuntimeError("a split update asked for a second collective")


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (FSDP2), or the tensor itself: elementwise work needs no DTensor dispatch."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
