"""AdaLomo: LOMO with an adaptive, factored learning rate (Lv et al., 2023/24).

The math follows the reference implementation (``lomo_optim.AdaLomo``) step for step, written so that a
fused update allocates no temporary the size of the parameter beyond what fp32 casting requires, and so
that a parameter that is a shard of a larger tensor (FSDP2) gives exactly the unsharded result.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable
from typing import Any

import torch
from torch import Tensor

from lomo_lightning.layout import ShardLayout, local_tensor
from lomo_lightning.optim.base import PerParameterOptimizer, run_update
from lomo_lightning.optim.kernels import (
    Compile,
    adalomo_apply_,
    adalomo_columns_,
    adalomo_prepare_,
    adalomo_statistics_,
    adalomo_vector_step_,
    compiled,
)
from lomo_lightning.optim.rounding import Write, write_


class AdaLomo(PerParameterOptimizer):
    r"""Adam-like adaptive update with factored second moments and grouped update normalization.

    For a step :math:`t \ge 1` with :math:`\beta_t = 1 - t^{c}` (``decay_rate`` :math:`c = -0.8`) and
    :math:`G = g^2 + \epsilon_1`:

    - 2-D :math:`W \in \mathbb{R}^{n \times m}`: :math:`R \leftarrow \beta_t R + (1-\beta_t)\,\mathrm{mean}(G, -1)`,
      :math:`C \leftarrow \beta_t C + (1-\beta_t)\,\mathrm{mean}(G, -2)`,
      :math:`u = g \odot (R / \bar R)^{-1/2} \otimes C^{-1/2}`;
      tensors with more than two dimensions are folded to ``(shape[0], -1)``.
    - 1-D: :math:`V \leftarrow \beta_t V + (1-\beta_t) G`, :math:`u = g / \sqrt{V}`.
    - Grouped update normalization: :math:`u \leftarrow u / \max(1, \mathrm{RMS}(u) / d)` (``clip_threshold`` :math:`d`).
    - :math:`\eta_t = \eta \max(\epsilon_2, \mathrm{RMS}(\theta))`,
      :math:`\theta \leftarrow \theta (1 - \eta_t \lambda) - \eta_t u`.

    State is fp32 and O(rows + cols) per matrix: ``exp_avg_sq_row``/``exp_avg_sq_col`` (2-D) or
    ``exp_avg_sq`` (1-D), plus ``step``. Parameters in bf16/fp16 are updated in fp32 and written back
    with ``rounding`` (Kahan summation adds ``kahan_comp``, 2 bytes a parameter).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        eps: :math:`(\epsilon_1, \epsilon_2)`: added to the squared gradient; floor of the parameter RMS.
        clip_threshold: :math:`d`, the largest RMS an update may have.
        decay_rate: :math:`c` in :math:`\beta_t = 1 - t^c`.
        weight_decay: decoupled weight decay :math:`\lambda`.
        rounding: how a 16-bit parameter receives its fp32 result: ``"stochastic"`` (unbiased),
            ``"kahan"`` (compensated) or ``"nearest"`` (loses small updates, as lomo-optim does).
        seed: seeds stochastic rounding's bits (default: ``torch.initial_seed()``); kept in the param groups.
        compile: ``"auto"`` (default), ``True`` or ``False``: a matrix's step as two compiled kernels, its
            statistics and its update with the write-back (:mod:`lomo_lightning.optim.kernels`); within one
            unit in the last place of the eager step (they sum in another order), nearly always equal.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        rounding: str = "stochastic",
        seed: int | None = None,
        compile: Compile = "auto",
    ):
        if lr < 0.0:
            raise ValueError(f"AdaLomo: lr must be >= 0, got {lr}.")
        if decay_rate >= 0.0:
            raise ValueError(f"AdaLomo: decay_rate must be negative (beta_t = 1 - t^decay_rate), got {decay_rate}.")
        if clip_threshold <= 0.0:
            raise ValueError(f"AdaLomo: clip_threshold must be > 0, got {clip_threshold}.")
        if weight_decay < 0.0:
            raise ValueError(f"AdaLomo: weight_decay must be >= 0, got {weight_decay}.")
        defaults = dict(
            lr=lr,
            eps=tuple(eps),
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            weight_decay=weight_decay,
            rounding=rounding,
            seed=seed,
        )
        super().__init__(params, defaults, compile=compile)

    @torch.no_grad()
    def step_parameter(self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False) -> None:
        """Update ``param`` alone from ``grad``.

        ``grad_is_scratch=True`` lets the update overwrite ``grad`` (the fused engine owns it and frees
        it right after), which saves a temporary the size of the parameter.
        """
        update = self.begin_step_parameter(param, grad, group, grad_is_scratch=grad_is_scratch)
        run_update(update, self.facts(param).layout)

    def begin_step_parameter(
        self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False
    ) -> Generator[Tensor, Tensor, None]:
        """The update of ``param`` as a coroutine, for an engine that batches the collectives of several.

        On a shard, ``next(update)`` runs it up to the partial sums it needs completed over the shard group
        (a 1-D fp32 tensor); :func:`finish_update` sends them back summed over the group and runs it to the
        end. A whole tensor's partial sums are complete: ``next(update, None)`` runs it to the end at once.
        The state's step count advances here.
        """
        facts = self._facts.get(param) or self.facts(param)
        shard = facts.layout
        state = self.state[param]
        if not state:
            self._init_state(param, state, shard)
        state["step"] += 1
        write = self.write_back(param, group, state) if facts.low_precision else None
        # a compiled step only reads the gradient: no fp32 copy of it is needed (a sharded vector's step is eager)
        reads_only = facts.compiled and (param.dim() >= 2 or shard.group is None)
        if facts.distributed:  # elementwise work on the local shards, the state's included
            param, grad = local_tensor(param), local_tensor(grad)
            state = {key: local_tensor(value) for key, value in state.items()}
        return adalomo_update(
            param,
            grad if reads_only else grad.to(torch.float32, copy=not grad_is_scratch),
            state,
            step=state["step"].item(),
            lr=group["lr"],
            eps=group["eps"],
            clip_threshold=group["clip_threshold"],
            decay_rate=group["decay_rate"],
            weight_decay=group["weight_decay"],
            shard=shard,
            write=write,
            compile=facts.compiled,
        )

    @staticmethod
    def _init_state(param: Tensor, state: dict[str, Any], shard: ShardLayout) -> None:
        """The fp32 statistics of a parameter's first step; under FSDP2 each rank keeps those of its own
        rows and of one chunk of the columns."""
        local_param = local_tensor(param)
        state["step"] = torch.tensor(0.0)
        if param.dim() >= 2:
            rows, cols = local_param.shape[0], math.prod(param.shape[1:])
            device = local_param.device
            state["exp_avg_sq_row"] = shard.like_rows(torch.zeros(rows, dtype=torch.float32, device=device), param)
            state["exp_avg_sq_col"] = shard.column_chunk(torch.zeros(cols, dtype=torch.float32, device=device), param)
        else:
            state["exp_avg_sq"] = shard.like_rows(torch.zeros_like(local_param, dtype=torch.float32), param)


# Rows per block times columns: 1 MiB of fp32, a temporary small enough to stay in cache.
_BLOCK_ELEMENTS = 2**18


def adalomo_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    step: float,
    lr: float,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    weight_decay: float,
    shard: ShardLayout,
    write: Write | None = None,
    compile: bool = False,
) -> Generator[Tensor, Tensor, None]:
    """One AdaLomo step on ``param`` (the local shard) from an fp32 ``grad`` that it may overwrite.

    A 16-bit ``param`` is updated on an fp32 working copy, written back by ``write`` (default: round to
    nearest). ``compile``: the step of a whole matrix is two compiled calls, up to its update and the update
    (:func:`~lomo_lightning.optim.kernels.adalomo_prepare_`, :func:`~lomo_lightning.optim.kernels.adalomo_apply_`),
    a sharded matrix's three around its collective (:func:`~lomo_lightning.optim.kernels.adalomo_statistics_`,
    :func:`~lomo_lightning.optim.kernels.adalomo_columns_`, ``adalomo_apply_``), a whole vector's one
    (:func:`~lomo_lightning.optim.kernels.adalomo_vector_step_`); they read ``grad`` (of any float dtype) without
    overwriting it and make no fp32 working copy. A sharded vector's step stays eager.

    A coroutine. On a shard (``shard.group``) it yields once, the partial sums that span the whole tensor,
    and continues when sent them summed over the shard group (see :func:`finish_update`); a whole tensor's
    sums are complete, and it runs to its end at the first ``next()``. The update's sum of squares follows
    from column sums, without a pass over ``u``: ``sum(u^2) = mean(R) * sum_j (sum_i g_ij^2 / R_i) / C_j``.
    A matrix's partial sums are ``[col sums of g^2, col sums of g^2 / R, (C,) sum(R), sum(theta^2)]``: on a
    shard each rank keeps one chunk of ``C`` and puts it at its place among zeros, so that the sum that
    completes the column sums also assembles the whole ``C`` (one collective of ``3 * cols + 2`` numbers). A
    vector's are ``[sum(u^2), sum(theta^2)]``.
    """
    eps1, eps2 = eps
    beta = 1.0 - math.pow(step, decay_rate)
    write = write or Write()
    decays = weight_decay != 0.0
    matrix = "exp_avg_sq_row" in state
    if matrix:
        # sum(theta^2), which scales every update of the tensor (lr_t), the same in the eager and the compiled step
        # (a kernel's sum, in another order, would move the last bit of the scale and with it the rounding of ~0.1%
        # of a bf16 tensor's elements): torch's. On CPU in blocks added in fp64 (its norm of a bf16 tensor makes an
        # fp32 copy of it: 47 ms for SmolLM2's embedding); elsewhere its norm, one reduction. Inline: the hot path
        flat = param.view(-1)
        if flat.device.type == "cpu":
            total = flat.new_zeros((), dtype=torch.float64)
            for start in range(0, flat.numel(), _BLOCK_ELEMENTS):
                total += torch.square(flat[start : start + _BLOCK_ELEMENTS].float()).sum()
            param_squares = total.float().reshape(1)
        else:
            param_squares = torch.linalg.vector_norm(flat, dtype=torch.float32).square_().reshape(1)
    if compile and (matrix or shard.group is None):
        # hyper-parameters as data: a new learning rate or step does not recompile
        hyper = torch.tensor(
            [beta, 1.0 - beta, eps1, lr, eps2, clip_threshold, weight_decay, shard.rows, shard.numel], dtype=torch.float32, device=param.device
        )
        if not matrix:
            compiled(adalomo_vector_step_)(param, grad, state["exp_avg_sq"], hyper, decays, write.rounding, write.key, write.compensation)
            return
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        p2d, g2d = param.view(row.numel(), -1), grad.view(row.numel(), -1)
        if shard.group is None:
            factor, decay, scale = compiled(adalomo_prepare_)(g2d, p2d, row, col, param_squares, hyper)
        else:
            col_squares, scaled_squares, row_sum = compiled(adalomo_statistics_)(g2d, p2d, row, hyper)
            cols = g2d.shape[1]
            whole_col = col_squares.new_zeros(cols)
            whole_col[shard.columns(cols)] = col
            sums = yield torch.cat([col_squares, scaled_squares, whole_col, row_sum, param_squares])
            whole_col = sums[2 * cols : 3 * cols]
            factor, decay, scale = compiled(adalomo_columns_)(whole_col, sums[:cols], sums[cols : 2 * cols], sums[-2:-1], sums[-1:], hyper)
            col.copy_(whole_col[shard.columns(cols)])
        compiled(adalomo_apply_)(p2d, g2d, row, factor, decay, scale, decays, write.rounding, write.key, write.compensation)
        return
    update = grad  # overwritten in place: from here on it holds u
    # the compiled step's values: sums of squares in kernels.accumulator's dtype, small sums in fp64 as
    # kernels.exact_sum adds them, roots correctly rounded (through fp64: eager fp32 sqrt on CPU is not), all inline
    # (the hot path)
    wide = torch.float64 if param.dtype == torch.float32 and param.device.type != "mps" else torch.float32
    exact = torch.float32 if param.device.type == "mps" else torch.float64
    if matrix:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        g2d = update.view(row.numel(), -1)
        rows, cols = g2d.shape
        # in blocks of rows: the row statistic of a block, then its column sums of g^2 and of (g / sqrt(R))^2 (g scaled
        # by its row factor on the way, the row half of u, known before any collective). The temporaries are the size
        # of a block: a whole g^2 would be one the size of the parameter, and one reduction over dim 0 of a large
        # matrix is slow on CPU
        col_sums, scaled_sums = g2d.new_zeros(cols, dtype=wide), g2d.new_zeros(cols, dtype=wide)
        rows_per_block = max(1, _BLOCK_ELEMENTS // (2 if wide == torch.float64 else 1) // max(cols, 1))  # 1 MiB blocks
        for start in range(0, rows, rows_per_block):
            block, block_row = g2d[start : start + rows_per_block], row[start : start + rows_per_block]
            squares = block.to(wide, copy=True).square_()  # one temporary at a time (fp64: twice the block's bytes)
            row_mean = squares.sum(1).float().div_(cols).add_(eps1)
            block_row.mul_(beta).add_(row_mean.mul_(1.0 - beta))  # two roundings and a sum, as the kernel
            col_sums.add_(squares.sum(0))
            del squares
            block.mul_(block_row.rsqrt().unsqueeze(1))
            scaled_sums.add_(block.to(wide, copy=True).square_().sum(0))
        parts = [col_sums.float(), scaled_sums.float()]
        if shard.group is not None:
            whole_col = g2d.new_zeros(cols)
            whole_col[shard.columns(cols)] = col
            parts.append(whole_col)
        partial = torch.cat([*parts, row.to(exact).sum().float().reshape(1), param_squares])
        sums = partial if shard.group is None else (yield partial)
        col_squares, scaled_squares = sums[:cols], sums[cols : 2 * cols]
        whole_col = col if shard.group is None else sums[2 * cols : 3 * cols]
        whole_col.mul_(beta).add_(col_squares.div_(shard.rows).add_(eps1).mul_(1.0 - beta))
        if whole_col is not col:
            col.copy_(whole_col[shard.columns(cols)])
        row_avg = sums[-2:-1].div(shard.rows)
        param_squares = sums[-1:]
        update_squares = scaled_squares.div_(whole_col).to(exact).sum().float().reshape(1).mul_(row_avg)
        # u = g * rsqrt(R) * sqrt(mean R) / sqrt(C)
        g2d.mul_(torch.div(row_avg.to(exact).sqrt_().float(), whole_col.to(exact).sqrt_().float()).unsqueeze(0))
    else:
        param_squares = param.to(wide).square().sum().float().reshape(1)
        vec = state["exp_avg_sq"]
        vec.mul_(beta).add_(update.square().add_(eps1).mul_(1.0 - beta))  # two roundings and a sum, as the kernel
        update.mul_(vec.rsqrt())
        partial = torch.cat([update.to(wide).square().sum().float().reshape(1), param_squares])
        sums = partial if shard.group is None else (yield partial)
        update_squares, param_squares = sums[0:1], sums[1:2]
    # grouped update normalization: u / max(1, RMS(u) / d); theta * decay - u * (lr_t / normalizer)
    normalizer = update_squares.div(shard.numel).to(exact).sqrt_().float().div_(clip_threshold).clamp_(min=1.0)
    lr_t = param_squares.div(shard.numel).to(exact).sqrt_().float().clamp_(min=eps2).mul_(lr)
    decay = 1.0 - lr_t * weight_decay
    scale = lr_t.div_(normalizer)
    work = param if param.dtype == torch.float32 else param.float()
    if decays:
        work.mul_(decay)
    work.sub_(update.mul_(scale))  # the kernel's roundings, in its order
    if work is not param:
        (compiled(write_) if compile else write_)(param.view(-1), work.view(-1), write.rounding, write.key, write.compensation)
