"""AdamW whose bias correction counts steps per entry (an ``age``), as SpIEL-AG needs for regrown entries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lomo_lightning.layout import local_tensor
from lomo_lightning.optim.base import PerParameterOptimizer
from lomo_lightning.optim.kernels import Compile, compiled, scalars, sft_adamw_step_
from lomo_lightning.optim.rounding import BLOCK, Write


class SFTAdamW(PerParameterOptimizer):
    r"""AdamW with a per-entry step count, the update rule of SpIEL's reference (its ``SftAdamW``).

    Each entry keeps an ``age`` :math:`a` (the number of steps its moments have seen, 1 at its first
    step). For the gradient :math:`g`:

    .. math::
        m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \\
        \theta \leftarrow \theta - \eta\, \frac{m}{\sqrt{v} + \epsilon} \cdot \frac{\sqrt{1 - \beta_2^{a}}}{1 - \beta_1^{a}},
        \qquad \theta \leftarrow \theta - \eta \lambda \theta, \qquad a \leftarrow a + 1

    (:math:`\epsilon` before the bias correction and weight decay after the update, on the updated
    value, as in the reference). While every entry has the same age this is AdamW with Hugging Face's
    :math:`\epsilon` placement. Sparse fine-tuning's accumulated-gradient regrowth seeds a regrown entry's
    moments from gradients gathered over a few steps and sets its ``age`` to their number, so that its
    first update is bias-corrected for what its moments have seen, not for the global step.

    State is fp32 (``age``, ``exp_avg``, ``exp_avg_sq``, all shaped like the parameter); parameters in
    bf16/fp16 are updated in fp32 and written back. Elementwise, so it runs on FSDP2 shards as they are.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`; 1e-6 by default, the reference's (``SftAdamW``'s own default, which the
            SpIEL paper's scripts keep), not PyTorch's 1e-8.
        weight_decay: decoupled weight decay :math:`\lambda`. On sparse fine-tuning's values (the deltas)
            it pulls each active weight toward its pretrained value; the paper's scripts search 1-30.
        rounding: how a 16-bit parameter receives its fp32 result (:class:`~lomo_lightning.optim.Lomo`);
            sparse fine-tuning's values are fp32, so it matters only for 16-bit parameters.
        seed: seeds stochastic rounding's bits (default: ``torch.initial_seed()``).
        compile: ``"auto"``, ``True`` or ``False``: each update, with its write-back, as one compiled pass
            (:func:`~lomo_lightning.optim.kernels.sft_adamw_step_`), bit-identical to the eager one.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rounding: str = "stochastic",
        seed: int | None = None,
        compile: Compile = "auto",
    ):
        if lr < 0.0:
            raise ValueError(f"SFTAdamW: lr must be >= 0, got {lr}.")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"SFTAdamW: betas must be in [0, 1), got {betas}.")
        if eps < 0.0:
            raise ValueError(f"SFTAdamW: eps must be >= 0, got {eps}.")
        if weight_decay < 0.0:
            raise ValueError(f"SFTAdamW: weight_decay must be >= 0, got {weight_decay}.")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rounding=rounding, seed=seed), compile=compile)

    @torch.no_grad()
    def step_parameter(self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False) -> None:
        """Update ``param`` alone from ``grad`` with the hyper-parameters of ``group``."""
        local_param = local_tensor(param)
        state = self.state[param]
        if not state:
            state["age"] = torch.ones_like(param, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        age, exp_avg, exp_avg_sq = (local_tensor(state[key]) for key in ("age", "exp_avg", "exp_avg_sq"))
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        facts = self._facts.get(param) or self.facts(param)
        write_back = None
        if facts.low_precision:
            if group["rounding"] == "stochastic":
                state.setdefault("step", torch.tensor(0.0))
                state["step"] += 1
            write_back = self.write_back(param, group, state)
        if facts.compiled:
            write = write_back or Write()
            compensation = write.compensation.view(-1) if write.compensation is not None else None
            hyper = scalars(beta1, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"], lr, 1.0 - lr * weight_decay, device=local_param.device)
            compiled(sft_adamw_step_)(
                local_param.view(-1), local_tensor(grad).reshape(-1), age.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1),
                hyper, weight_decay > 0.0, write.rounding, write.key, compensation,
            )  # fmt: skip
            return
        # the kernel's roundings in its order (no fused multiply-add: alpha=, addcmul and addcdiv would contract)
        grad = local_tensor(grad).to(torch.float32)
        scratch = grad * (1.0 - beta1)
        exp_avg.mul_(beta1).add_(scratch)
        exp_avg_sq.mul_(beta2).add_(torch.mul(grad, grad, out=scratch).mul_(1.0 - beta2))
        # the denominator, bias-corrected entry by entry: (sqrt(v) + eps) * (1 - beta1^a) / sqrt(1 - beta2^a)
        denom = correctly_rounded_sqrt(exp_avg_sq, out=scratch).add_(group["eps"])
        denom.mul_(torch.pow(beta1, age).neg_().add_(1.0))
        denom.div_(torch.pow(beta2, age).neg_().add_(1.0).sqrt_())
        step = torch.div(exp_avg, denom, out=denom).mul_(lr)
        work = local_param if local_param.dtype == torch.float32 else local_param.float()
        work.sub_(step)
        if weight_decay > 0.0:
            work.mul_(1.0 - lr * weight_decay)
        if work is not local_param:
            (write_back or Write())(local_param, work)
        age.add_(1.0)


def correctly_rounded_sqrt(x: Tensor, out: Tensor) -> Tensor:
    """``sqrt(x)`` rounded once, as IEEE 754 (and a compiled kernel, and CUDA) round it, into ``out``.

    Eager ``torch.sqrt`` of fp32 on CPU may call MKL's vector math, which is within one unit but not
    correctly rounded (16% of the results of random inputs differ). The square root of fp32 computed
    in fp64 and rounded to fp32 is the correctly rounded one (fp64 has more than twice fp32's precision);
    in blocks of :data:`BLOCK` elements, so the fp64 temporary stays small.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.sqrt(x, out=out)
    flat_x, flat_out = x.view(-1), out.view(-1)
    for start in range(0, flat_x.numel(), BLOCK):
        flat_out[start : start + BLOCK].copy_(flat_x[start : start + BLOCK].double().sqrt_())
    return out


# The name before one casing of acronyms (issue 20), still importable: it was public.
SftAdamW = SFTAdamW

__all__ = ["SFTAdamW", "SftAdamW"]
