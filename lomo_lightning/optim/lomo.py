"""LOMO: plain SGD with decoupled weight decay, meant to run inside backward (Lv et al., 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lomo_lightning.layout import local_tensor
from lomo_lightning.optim.base import PerParameterOptimizer
from lomo_lightning.optim.kernels import Compile, compiled, lomo_step_, scalars
from lomo_lightning.optim.rounding import Write, write_


class Lomo(PerParameterOptimizer):
    r"""SGD with decoupled weight decay, separable per parameter so that it can be fused into backward.

    .. math::
        \theta \leftarrow \theta (1 - \eta \lambda) - \eta g

    Gradient clipping (by value, then by the global norm measured in a first backward pass) is not
    part of the rule: :class:`~lomo_lightning.FusedUpdater` applies it before the rule sees ``g``.
    Parameters in bf16/fp16 are updated in fp32 and written back with ``rounding``. The rule keeps no
    state, except a step count for each 16-bit parameter under stochastic rounding (which keys its
    random bits) and the compensation buffer under Kahan summation.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        weight_decay: decoupled weight decay :math:`\lambda`.
        rounding: how a 16-bit parameter receives its fp32 result: ``"stochastic"`` (unbiased),
            ``"kahan"`` (compensated, 2 bytes a parameter) or ``"nearest"`` (loses small updates).
        seed: seeds stochastic rounding's bits (default: ``torch.initial_seed()``); kept in the param groups.
        compile: ``"auto"`` (default), ``True`` or ``False``: each update as one compiled pass
            (:mod:`lomo_lightning.optim.kernels`), bit-identical to the eager one.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        rounding: str = "stochastic",
        seed: int | None = None,
        compile: Compile = "auto",
    ):
        if lr < 0.0:
            raise ValueError(f"Lomo: lr must be >= 0, got {lr}.")
        if weight_decay < 0.0:
            raise ValueError(f"Lomo: weight_decay must be >= 0, got {weight_decay}.")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, rounding=rounding, seed=seed), compile=compile)

    @torch.no_grad()
    def step_parameter(self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False) -> None:
        """Update ``param`` alone from ``grad`` with the hyper-parameters of ``group``."""
        facts = self._facts.get(param) or self.facts(param)
        write = None
        if facts.low_precision:
            state = self.state[param]
            if group["rounding"] == "stochastic":
                state.setdefault("step", torch.tensor(0.0))
                state["step"] += 1
            write = self.write_back(param, group, state)
        # elementwise: a shard (FSDP2 DTensor) is updated through its local tensor, without DTensor dispatch
        if facts.distributed:
            param, grad = local_tensor(param), local_tensor(grad)
        lomo_update(
            param,
            grad,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            write=write,
            grad_is_scratch=grad_is_scratch,
            compile=facts.compiled,
        )


def lomo_update(
    param: Tensor,
    grad: Tensor,
    *,
    lr: float,
    weight_decay: float,
    write: Write | None = None,
    grad_is_scratch: bool = False,
    compile: bool = False,
) -> None:
    """``param <- param * (1 - lr * weight_decay) - grad * lr``, computed in fp32 (a 16-bit ``param`` via ``write``).

    Three roundings, in this order, eager or compiled (:func:`~lomo_lightning.optim.kernels.lomo_step_`,
    one pass with no fp32 working copy): the two are bit-identical. ``grad_is_scratch``: ``grad`` (fp32)
    may be overwritten, which spares the eager update a temporary.
    """
    write = write or Write()
    if compile:
        hyper = scalars(lr, 1.0 - lr * weight_decay, device=param.device)
        compiled(lomo_step_)(param.view(-1), grad.view(-1), hyper, weight_decay != 0.0, write.rounding, write.key, write.compensation)
        return
    work = param if param.dtype == torch.float32 else param.float()
    if weight_decay != 0.0:
        work.mul_(1.0 - lr * weight_decay)
    step = grad.mul_(lr) if grad_is_scratch and grad.dtype == torch.float32 else grad.to(torch.float32, copy=True).mul_(lr)
    work.sub_(step)
    if work is not param:
        write_(param.view(-1), work.view(-1), write.rounding, write.key, write.compensation)
