"""SM3: an adaptive rule whose second-moment statistics cost O(rows + cols) per matrix (Anil et al., 2019).

As SpIEL's reference (AlanAnsell/peft, ``tuners/sft/optimizer.py``, ``SftSM3``) uses it for sparse
fine-tuning, where its row and column accumulators also score which inactive entries should grow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lomo_lightning.layout import matrix_entries, shard_group
from lomo_lightning.optim.base import PerParameterOptimizer
from lomo_lightning.optim.kernels import Compile, compiled, scalars, sm3_step_
from lomo_lightning.optim.rounding import BLOCK, Write


class SM3(PerParameterOptimizer):
    r"""SM3 with decoupled weight decay, separable per parameter so that it fuses into backward.

    A tensor of shape :math:`(n_1, \dots, n_r)` keeps one accumulator per index of each dimension,
    ``accumulator_d`` of shape :math:`(1, \dots, n_d, \dots, 1)`. For the gradient :math:`g`:

    .. math::
        \nu = \min_d a_d[i_d] + g^2, \qquad a_d[i] \leftarrow \max_{\text{entries with } i_d = i} \nu, \qquad
        u = g / \sqrt{\nu + \epsilon}

    then with momentum :math:`\mu` (``momentum_buffer``) :math:`u \leftarrow (1 - \mu) u + \mu\, u_{\text{prev}}`, and

    .. math::
        \theta \leftarrow \theta - \eta u, \qquad \theta \leftarrow \theta - \eta \lambda \theta

    (weight decay after the update, on the updated value, as the reference does). Every accumulator
    bounds the sum of squared gradients of the entries it covers, so :math:`\nu` does too.

    A 1-D parameter that holds ``k`` entries of a matrix (:func:`matrix_entries`, SFT's values) keeps
    the accumulators of the whole matrix, ``(rows, 1)`` and ``(1, cols)``, fed by its entries only:
    O(rows + cols) state for ``k`` values, and ``accumulator_0 * accumulator_1`` is the growth score of
    SpIEL-MA. State is fp32; parameters in bf16/fp16 are updated in fp32 and written back.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        momentum: :math:`\mu` in ``[0, 1)``; the buffer exists only when it is positive.
        weight_decay: decoupled weight decay :math:`\lambda`.
        eps: :math:`\epsilon`, added to :math:`\nu` before the square root.
        rounding: how a 16-bit parameter receives its fp32 result (:class:`~lomo_lightning.optim.Lomo`);
            sparse fine-tuning's values are fp32, so it matters only for 16-bit parameters.
        seed: seeds stochastic rounding's bits (default: ``torch.initial_seed()``).
        compile: ``"auto"``, ``True`` or ``False``: each update, with its write-back, as one compiled pass
            (:func:`~lomo_lightning.optim.kernels.sm3_step_`); bit-identical to the eager one (its reductions
            are maxima, exact in any order).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        rounding: str = "stochastic",
        seed: int | None = None,
        compile: Compile = "auto",
    ):
        if lr < 0.0:
            raise ValueError(f"SM3: lr must be >= 0, got {lr}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SM3: momentum must be in [0, 1), got {momentum}.")
        if weight_decay < 0.0:
            raise ValueError(f"SM3: weight_decay must be >= 0, got {weight_decay}.")
        if eps < 0.0:
            raise ValueError(f"SM3: eps must be >= 0, got {eps}.")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, rounding=rounding, seed=seed), compile=compile)

    @torch.no_grad()
    def step_parameter(self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False) -> None:
        """Update ``param`` alone from ``grad`` with the hyper-parameters of ``group``."""
        if shard_group(param) is not None:
            raise NotImplementedError(
                "SM3 keeps accumulators over whole dimensions and does not run on FSDP2 shards; sparse fine-tuning's "
                "values stay replicated (out of fully_shard) and work."
            )
        entries = matrix_entries(param)
        shape = (tuple(param.shape) or (1,)) if entries is None else entries[1]
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            for dim, size in enumerate(shape):
                accumulator_shape = [1] * len(shape)
                accumulator_shape[dim] = size
                state[f"accumulator_{dim}"] = torch.zeros(accumulator_shape, dtype=torch.float32, device=param.device)
        accumulators = [state[f"accumulator_{dim}"] for dim in range(len(shape))]
        momentum = group["momentum"]
        if momentum > 0.0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(shape if entries is None else param.shape, dtype=torch.float32, device=param.device)
        buffer = state.get("momentum_buffer") if momentum > 0.0 else None
        state["step"] += 1
        facts = self._facts.get(param) or self.facts(param)
        write_back = self.write_back(param, group, state) if facts.low_precision else None
        lr, weight_decay = group["lr"], group["weight_decay"]
        if facts.compiled:
            write = write_back or Write()
            view = shape if entries is None else (-1,)  # dense: shaped like the accumulators' broadcast
            compensation = write.compensation.view(view) if write.compensation is not None else None
            hyper = scalars(group["eps"], momentum, 1.0 - momentum, lr, 1.0 - lr * weight_decay, device=param.device)
            compiled(sm3_step_)(
                param.view(view), grad.view(view), accumulators, None if entries is None else entries[0],
                buffer, hyper, weight_decay > 0.0, write.rounding, write.key, compensation,
            )  # fmt: skip
            return
        # the kernel's roundings in its order (no fused multiply-add: alpha= and addcmul would contract)
        grad = grad.to(torch.float32, copy=not grad_is_scratch)
        if entries is None:
            grad = grad.view(shape)  # a scalar as one entry
            nu = _dense_accumulate(accumulators, grad)
        else:
            nu = _entries_accumulate(accumulators, grad, entries[0], shape)
        update = nu.add_(group["eps"]).rsqrt_().mul_(grad)  # nu's memory from here on
        if buffer is not None:
            buffer.mul_(momentum).add_(update.mul_(1.0 - momentum))
            torch.mul(buffer, lr, out=update)
        else:
            update.mul_(lr)
        work = param if param.dtype == torch.float32 else param.float()
        work.sub_(update.view_as(work))
        if weight_decay > 0.0:
            work.mul_(1.0 - lr * weight_decay)
        if work is not param:
            (write_back or Write())(param, work)


def _dense_accumulate(accumulators: list[Tensor], grad: Tensor) -> Tensor:
    """``nu = min_d a_d + g^2`` (broadcast), then every ``a_d`` becomes the max of ``nu`` over the other dimensions."""
    nu = accumulators[0].expand_as(grad).clone()
    for accumulator in accumulators[1:]:
        torch.minimum(nu, accumulator, out=nu)
    flat_nu, flat_grad = nu.view(-1), grad.reshape(-1)
    for start in range(0, flat_nu.numel(), BLOCK):  # + g*g, rounded before the sum; a block's temporary at most
        flat_nu[start : start + BLOCK].add_(flat_grad[start : start + BLOCK].square())
    for dim, accumulator in enumerate(accumulators):
        others = [d for d in range(grad.dim()) if d != dim]
        accumulator.copy_(nu.amax(dim=others, keepdim=True) if others else nu)
    return nu


def _entries_accumulate(accumulators: list[Tensor], grad: Tensor, indices: Tensor, shape: tuple[int, ...]) -> Tensor:
    """:func:`_dense_accumulate` for ``k`` entries of a matrix at flat ``indices``: only their rows and columns move."""
    if len(shape) != 2:
        raise ValueError(f"SM3: entries of a matrix need a 2-D shape, got {shape}.")
    rows_acc, cols_acc = accumulators[0].view(-1), accumulators[1].view(-1)
    indices = indices.long()
    rows = torch.div(indices, shape[1], rounding_mode="floor")
    cols = indices - rows * shape[1]
    nu = torch.minimum(rows_acc[rows], cols_acc[cols]).add_(grad.square())
    rows_acc.scatter_reduce_(0, rows, nu, "amax", include_self=True)
    cols_acc.scatter_reduce_(0, cols, nu, "amax", include_self=True)
    return nu


__all__ = ["SM3", "matrix_entries"]
