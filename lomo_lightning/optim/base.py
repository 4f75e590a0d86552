"""What every rule here shares: ``step()`` is a loop over parameters calling ``step_parameter``."""

from __future__ import annotations

from collections.abc import Callable
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
        """
        raise NotImplementedError


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (FSDP2), or the tensor itself: elementwise work needs no DTensor dispatch."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
