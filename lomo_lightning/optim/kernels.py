"""Compiled kernels: a rule's per-parameter math and its 16-bit write-back as one ``torch.compile``d pass.

Each rule's step is a chain of elementwise torch ops (and, for AdaLomo, a few row and column sums). Run
eagerly, every op is a pass over the parameter; compiled by inductor (C++/OpenMP on CPU, Triton on CUDA)
the chain fuses into one or two loops that read the parameter and its gradient once and write the
parameter in place, with no fp32 working copy. The functions compiled here are plain torch code, the
same that the eager path runs (or, where the eager path is the memory-lean in-place reference, the same
ops in the same order), so:

- elementwise steps (LOMO, SFTAdamW, the write-back of every rule) and SM3 (whose reductions are maxima,
  exact in any order) are bit-identical compiled and eager: IEEE ops in the same order, inductor contracts
  no multiply-add (``-ffp-contract=off``), and the eager steps avoid torch's fused ones (``alpha=``,
  ``addcmul``, ``addcdiv`` run as multiply-adds on CPU);
- AdaLomo's sums add in another order. Where the parameter can see their last bit they are rounded from
  fp64 in both paths (the squares of an fp32 matrix, :func:`accumulator`; every small sum,
  :func:`exact_sum`), its roots are correctly rounded in both (eager fp32 ``sqrt`` on CPU is not), and
  ``sum(theta^2)``, which scales every update of the tensor, is torch's in both; a 16-bit matrix's gradient
  squares add in fp32 (two levels, :func:`column_sums`), which its write-back does not see. Its step is within one unit in the
  last place of the eager one and nearly always equal (SmolLM2, 5 steps: ``benchmarks/compiled_kernels.py``).

Two things inductor's CPU code does slowly, element by element through a buffer: reinterpreting a float's
bits as an integer (``Tensor.view(dtype)``) and converting between dtypes of different vector lengths
(int64 to int32, fp32 to fp64). The write-back hashes int32 words (no int64) and has the two
reinterpretations bf16 stochastic rounding needs; the fp64 sums are kept to what fp32 parameters need.
And one it does wrong: integer ``<=``, ``>=`` and ``!=`` in AVX2 code (torch 2.13) select the wrong branch of a
``where``; the kernels compare integers with ``<``, ``>`` and ``==`` only.

Each function is compiled once per process with dynamic shapes (``torch.compile(dynamic=True)``) and
shared by every parameter of every rule; hyper-parameters reach it as tensors, so a learning-rate
schedule does not recompile. ``compile="auto"`` (the default of the rules and the engine) compiles for a
rule over at least :data:`AUTO_MIN_ELEMENTS` elements where a one-time probe finds a working compiler,
and otherwise runs eagerly (saying so in one logged line where the compiler fails);
the environment variable ``LOMO_LIGHTNING_COMPILE`` (``0``/``1``/``auto``) decides ``"auto"`` instead
(the test suite sets it to ``0`` and runs its compiled group with ``-m compiled``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Literal

import torch
from torch import Tensor

from lomo_lightning.optim.compiling import compiled
from lomo_lightning.optim.rounding import write_

log = logging.getLogger(__name__)

Compile = bool | Literal["auto"]
COMPILE_ENV = "LOMO_LIGHTNING_COMPILE"
# "auto" compiles for rules over at least this many elements: below, the one-time compilation (10-60 s on
# a small CPU) costs more than eager steps lose (a quick start on a tiny model stays as fast as it was)
AUTO_MIN_ELEMENTS = 2**25


def check_compile(compile: Any, owner: str) -> Compile:
    """``compile`` if it is ``True``, ``False`` or ``"auto"``; a ``ValueError`` naming ``owner`` otherwise."""
    if isinstance(compile, bool):
        return compile
    if compile == "auto":
        return "auto"
    raise ValueError(f"{owner}: compile must be True, False or 'auto', got {compile!r}.")


def use_compile(compile: Compile, device: torch.device | str = "cpu", elements: int | None = None) -> bool:
    """Whether to run compiled kernels on ``device``: ``compile`` itself; for ``"auto"`` the environment
    (``LOMO_LIGHTNING_COMPILE``) if set, else whether the rule is large enough (``elements``, the number of
    elements it updates, at least :data:`AUTO_MIN_ELEMENTS`) and the probe of the device type succeeds."""
    if compile != "auto":
        return bool(compile)
    setting = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if setting in ("0", "false", "off", "no"):
        return False
    if setting in ("1", "true", "on", "yes"):
        return True
    if elements is not None and elements < AUTO_MIN_ELEMENTS:
        return False
    return compiler_works(torch.device(device).type)


@functools.cache
def compiler_works(device_type: str = "cpu") -> bool:
    """Once per process: does ``torch.compile`` build and run a small integer-and-float kernel here?

    Compiles the stochastic write of a few elements (the arithmetic every kernel uses); any failure
    (no C++ compiler, no Triton, an unsupported backend) means eager, with one logged line.
    """
    try:
        # more elements than a vector register holds, values in and out of bf16's range: a kernel that picks the
        # wrong branch of a `where` (as inductor's AVX2 code did for integer `<=`) differs from eager here
        param = torch.zeros(100, dtype=torch.bfloat16, device=device_type)
        work = torch.cat([torch.linspace(-1, 1, 96), torch.tensor([3.4e38, -torch.inf, 1e-40, -0.0])]).to(device_type)
        key = torch.tensor([1, 0], dtype=torch.int64, device=device_type)
        compiled(write_)(param, work, "stochastic", key, None)
        expected = torch.zeros_like(param)
        write_(expected, work, "stochastic", key, None)
        if not torch.equal(param.view(torch.int16), expected.view(torch.int16)):
            raise RuntimeError("the compiled write differs from the eager one")
    except Exception as error:  # noqa: BLE001 - any failure of the compiler means the eager fallback
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        log.warning("lomo_lightning: torch.compile does not work on %s here (%s); the update rules run eagerly.", device_type, reason)
        return False
    return True


def scalars(*values: float, device: torch.device) -> Tensor:
    """Hyper-parameters as one fp32 tensor: a kernel reads them as data, so new values do not recompile."""
    return torch.tensor(values, dtype=torch.float32, device=device)


# -- the rules' kernels --------------------------------------------------------------------------
# Flat (or 2-D) local tensors in, the parameter (and Kahan buffer, statistics) written in place. A 16-bit
# parameter never gets an fp32 working copy: its new value exists only inside the kernel's loop.


def _store_(param: Tensor, work: Tensor, rounding: str, key: Tensor | None, compensation: Tensor | None) -> None:
    """``param <- work``: fp32 as it is, bf16/fp16 through the write-back. Stochastic rounding numbers the elements
    of flat tensors; the others write in ``param``'s shape, ``compensation`` (Kahan, flat) viewed in it: a matrix's
    flat write would flatten the kernel's loop, and the row and column factors of each element become gathers
    through an integer division (7x the time of the nearest write)."""
    if param.dtype == torch.float32:
        param.copy_(work)
    elif rounding == "stochastic":
        write_(param.view(-1), work.reshape(-1), rounding, key, compensation)
    else:
        write_(param, work, rounding, key, None if compensation is None else compensation.view(param.shape))


def lomo_step_(
    param: Tensor, grad: Tensor, hyper: Tensor, decays: bool, rounding: str, key: Tensor | None, compensation: Tensor | None
) -> None:
    """LOMO: ``param <- param * hyper[1] - grad * hyper[0]`` (``hyper = [lr, 1 - lr * weight_decay]``) in fp32.

    The eager :func:`~lomo_lightning.optim.lomo.lomo_update` does the same three roundings in this order.
    """
    work = param.float()
    if decays:
        work = work * hyper[1]
    _store_(param, work - grad.float() * hyper[0], rounding, key, compensation)


# Rows per block of a compiled column sum: a sum down a whole column adds in one long run (off by ~1e-5 over
# SmolLM2's 49152-row embedding); sums of blocks of rows, then of the blocks, are as accurate as torch's.
_SUM_BLOCK = 64


def accumulator(param: Tensor) -> torch.dtype:
    """The dtype AdaLomo sums a matrix's squares in: what the parameter can see of the sums' last bits.

    An fp32 parameter's update shows the last bit of its statistics, and eager and compiled steps add in
    another order: in fp64 (each square of an fp32 value exact, the sum off by ~``n * 2^-53``) both round to
    the same fp32 sum, nearly always. A 16-bit parameter's write-back does not see those bits: fp32, as fast
    as the data can be read (inductor converts fp32 to fp64 element by element on CPU). MPS has no fp64.
    """
    if param.dtype == torch.float32 and param.device.type != "mps":
        return torch.float64
    return torch.float32


def column_sums(x: Tensor) -> Tensor:
    """The sums of the columns of ``x`` (2-D) in two levels: blocks of :data:`_SUM_BLOCK` rows, then the blocks."""
    if x.shape[0] < 2 * _SUM_BLOCK:  # a graph of its own (dynamo guards on the size), without blocks
        return x.sum(0)
    count = x.shape[0] // _SUM_BLOCK
    blocks = x[: count * _SUM_BLOCK].reshape(count, _SUM_BLOCK, x.shape[1]).sum(1)
    return blocks.sum(0) + x[count * _SUM_BLOCK :].sum(0)


def exact_sum(x: Tensor) -> Tensor:
    """The sum of a small fp32 tensor, added in fp64 and rounded once: the same value in any order of the adds.

    (Square roots need no such care in a kernel: compiled, fp32 ``sqrt`` is correctly rounded, and the eager
    step takes its roots through fp64, which rounds to the same value: eager fp32 ``torch.sqrt`` on CPU is
    not always correctly rounded, MKL's vector math, 17% of random inputs, single elements too.)"""
    return x.sum() if x.device.type == "mps" else x.double().sum().float()


def adalomo_statistics_(grad: Tensor, param: Tensor, row: Tensor, hyper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AdaLomo's work on a matrix before its collective, reading the gradient once: the row statistic ``R`` updated
    in place, and ``(col sums of g^2, col sums of (g / sqrt(R))^2, sum(R))``. ``param``: for its dtype only.

    ``hyper`` starts ``[beta, 1 - beta, eps1]``. The eager :func:`~lomo_lightning.optim.adalomo.adalomo_update` makes
    the same elementwise ops in the same order and sums the squares in the same dtype (:func:`accumulator`), in
    another order. ``grad`` is read only.
    """
    wide = accumulator(param)
    grad = grad.float()  # a 16-bit gradient is widened as the eager step widens it
    row_mean = grad.to(wide).square().sum(1).float() / grad.shape[1] + hyper[2]
    new_row = row * hyper[0] + row_mean * hyper[1]
    row.copy_(new_row)
    col_squares = column_sums(grad.to(wide).square()).float()
    scaled_squares = column_sums((grad * new_row.rsqrt().unsqueeze(1)).to(wide).square()).float()
    return col_squares, scaled_squares, exact_sum(new_row).reshape(1)


def adalomo_scalars(update_squares: Tensor, param_squares: Tensor, hyper: Tensor) -> tuple[Tensor, Tensor]:
    """``(decay, scale)`` of an AdaLomo step: ``lr_t = lr * max(eps2, RMS(theta))``, ``decay = 1 - lr_t * wd``,
    ``scale = lr_t / max(1, RMS(u) / d)``. ``hyper = [beta, 1 - beta, eps1, lr, eps2, d, wd, rows, numel]``."""
    normalizer = torch.clamp(torch.sqrt(update_squares / hyper[8]) / hyper[5], min=1.0)
    lr_t = torch.maximum(torch.sqrt(param_squares / hyper[8]), hyper[4]) * hyper[3]
    return 1.0 - lr_t * hyper[6], lr_t / normalizer


def adalomo_columns_(
    col: Tensor, col_squares: Tensor, scaled_squares: Tensor, row_sum: Tensor, param_squares: Tensor, hyper: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """AdaLomo's step of a matrix between its sums (complete) and its update: the column statistic ``C`` (``col``,
    the whole one) updated in place, and ``(factor, decay, scale)`` for :func:`adalomo_apply_`, ``factor =
    sqrt(mean R) / sqrt(C)``. The eager :func:`~lomo_lightning.optim.adalomo.adalomo_update` makes the same ops in the
    same order (its small sums through :func:`exact_sum`, its roots correctly rounded, as here).

    Returned rather than used: a small tensor computed in the kernel of the elementwise update would be
    recomputed for every element (a root and a division per element).
    """
    col.copy_(col * hyper[0] + (col_squares / hyper[7] + hyper[2]) * hyper[1])
    row_avg = row_sum / hyper[7]
    decay, scale = adalomo_scalars(exact_sum(scaled_squares / col) * row_avg, param_squares, hyper)
    return torch.sqrt(row_avg) / torch.sqrt(col), decay, scale


def adalomo_prepare_(grad: Tensor, param: Tensor, row: Tensor, col: Tensor, param_squares: Tensor, hyper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A whole (unsharded) matrix's step up to its update, one compiled call: :func:`adalomo_statistics_`, then
    :func:`adalomo_columns_` (``param_squares``: ``sum(theta^2)``, torch's, as eager)."""
    col_squares, scaled_squares, row_sum = adalomo_statistics_(grad, param, row, hyper)
    return adalomo_columns_(col, col_squares, scaled_squares, row_sum, param_squares, hyper)


def adalomo_apply_(
    param: Tensor,
    grad: Tensor,
    row: Tensor,
    factor: Tensor,
    decay: Tensor,
    scale: Tensor,
    decays: bool,
    rounding: str,
    key: Tensor | None,
    compensation: Tensor | None,
) -> None:
    """AdaLomo's update of a matrix, one elementwise pass: ``u = g * rsqrt(R) * factor``,
    ``theta <- theta * decay - u * scale``, written back. The same roundings as the eager update."""
    update = grad.float() * row.rsqrt().unsqueeze(1) * factor.unsqueeze(0)
    work = param.float()
    if decays:
        work = work * decay
    _store_(param, work - update * scale, rounding, key, compensation)


def adalomo_vector_step_(
    param: Tensor, grad: Tensor, vec: Tensor, hyper: Tensor, decays: bool, rounding: str, key: Tensor | None, compensation: Tensor | None
) -> None:
    """A whole vector's AdaLomo step as one compiled call: ``V <- beta V + (1 - beta)(g^2 + eps1)``, ``u = g / sqrt(V)``,
    the scalars (:func:`adalomo_scalars`, the sums of squares in :func:`accumulator`'s dtype), the update written
    back. The eager :func:`~lomo_lightning.optim.adalomo.adalomo_update` makes the same ops in the same order."""
    wide = accumulator(param)
    grad = grad.float()
    new_vec = vec * hyper[0] + (grad * grad + hyper[2]) * hyper[1]
    vec.copy_(new_vec)
    update = grad * new_vec.rsqrt()
    update_squares = update.to(wide).square().sum().float()
    param_squares = param.float().to(wide).square().sum().float()
    decay, scale = adalomo_scalars(update_squares, param_squares, hyper)
    work = param.float()
    if decays:
        work = work * decay
    _store_(param, work - update * scale, rounding, key, compensation)


def sm3_step_(
    param: Tensor,
    grad: Tensor,
    accumulators: list[Tensor],
    indices: Tensor | None,
    buffer: Tensor | None,
    hyper: Tensor,
    decays: bool,
    rounding: str,
    key: Tensor | None,
    compensation: Tensor | None,
) -> None:
    """SM3 (:class:`~lomo_lightning.optim.SM3`): ``nu = min_d a_d + g*g``, every ``a_d`` the max of ``nu`` over the
    other dimensions, ``u = rsqrt(nu + eps) * g``, momentum ``u <- b * mu + u * (1 - mu)``,
    ``theta <- (theta - u * lr) * (1 - lr * wd)``, written back. ``hyper = [eps, mu, 1 - mu, lr, 1 - lr * wd]``.

    Dense (``indices`` is ``None``): ``param`` and ``grad`` shaped like the accumulators' broadcast. Entries of a
    matrix (``indices``, flat positions in it): ``accumulators`` are its ``(rows, 1)`` and ``(1, cols)`` ones.
    Its reductions are maxima and minima, exact in any order: the same ops as the eager step, bit for bit.
    """
    g = grad.float()
    if indices is None:
        nu = accumulators[0]
        for accumulator in accumulators[1:]:
            nu = torch.minimum(nu, accumulator)
        nu = nu + g * g
        for dim, accumulator in enumerate(accumulators):
            others = [d for d in range(g.dim()) if d != dim]
            accumulator.copy_(nu.amax(dim=others, keepdim=True) if others else nu)
    else:
        rows_acc, cols_acc = accumulators[0].view(-1), accumulators[1].view(-1)
        flat = indices.long()
        rows = torch.div(flat, cols_acc.shape[0], rounding_mode="floor")
        cols = flat - rows * cols_acc.shape[0]
        nu = torch.minimum(rows_acc[rows], cols_acc[cols]) + g * g
        rows_acc.scatter_reduce_(0, rows, nu, "amax", include_self=True)
        cols_acc.scatter_reduce_(0, cols, nu, "amax", include_self=True)
    update = (nu + hyper[0]).rsqrt() * g
    if buffer is not None:
        update = buffer * hyper[1] + update * hyper[2]
        buffer.copy_(update)
    work = param.float() - update * hyper[3]
    if decays:
        work = work * hyper[4]
    _store_(param, work, rounding, key, compensation)


def sft_adamw_step_(
    param: Tensor,
    grad: Tensor,
    age: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    hyper: Tensor,
    decays: bool,
    rounding: str,
    key: Tensor | None,
    compensation: Tensor | None,
) -> None:
    """SFTAdamW (:class:`~lomo_lightning.optim.SFTAdamW`), elementwise and bit for bit the eager step:
    ``m <- m * b1 + g * (1 - b1)``, ``v <- v * b2 + (g * g) * (1 - b2)``,
    ``d = (sqrt(v) + eps) * (1 - b1^a) / sqrt(1 - b2^a)``, ``theta <- (theta - (m / d) * lr) * (1 - lr * wd)``,
    written back, ``a <- a + 1``. ``hyper = [b1, 1 - b1, b2, 1 - b2, eps, lr, 1 - lr * wd]``."""
    g = grad.float()
    m = exp_avg * hyper[0] + g * hyper[1]
    v = exp_avg_sq * hyper[2] + (g * g) * hyper[3]
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    denom = (v.sqrt() + hyper[4]) * (1.0 - torch.pow(hyper[0], age)) / (1.0 - torch.pow(hyper[2], age)).sqrt()
    work = param.float() - (m / denom) * hyper[5]
    if decays:
        work = work * hyper[6]
    _store_(param, work, rounding, key, compensation)
    age.copy_(age + 1.0)
