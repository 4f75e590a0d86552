"""Writing an fp32 result back into a bf16/fp16 parameter without losing the update.

A rule computes the new value of a 16-bit parameter in fp32. Round-to-nearest (``param.copy_(work)``)
drops every change smaller than half a unit in the last place (bf16: 2^-9 relative), which at
fine-tuning learning rates is most of them. Two cures, selected by ``rounding``:

- ``"stochastic"``: round up or down at random, with the probabilities that make the rounding
  unbiased, ``E[round(x)] = x``: a small update moves the parameter with a probability proportional to
  its size, so the expected trajectory is fp32's. No extra state.
- ``"kahan"``: round to nearest, and keep what the rounding lost in a 16-bit compensation buffer that is
  added back at the next write (Kahan summation, as torch-optimi does it). Deterministic; 2 bytes a parameter.
- ``"nearest"``: round to nearest (what lomo-optim does).

fp32 parameters never reach this module: the rule updates them in place.

Random bits. Stochastic rounding must not make the update depend on the order in which parameters are
updated: the fused engine updates them in backward order, ``step()`` in param-group order, a resumed run
starts in the middle. So the bits are not drawn from one stream consumed in update order. They are a
function of what the write is: the bits of the write at step ``t`` of the parameter at position ``index``
in the optimizer's param groups come from a generator on the parameter's device seeded with a hash of
``(seed, t, index, block)``, where ``block`` numbers runs of :data:`BLOCK` elements of the whole (global)
flattened tensor. The seed is in the param group and ``t`` in the optimizer state, so a checkpoint holds
all there is: a resumed run is bit-identical to an uninterrupted one, fused equals unfused, and because
blocks count global elements, a shard of an FSDP2 parameter draws the same bits for its elements as the
whole tensor does on one process (and DDP replicas draw the same bits, so they stay equal). This is what
"a seeded generator per device, saved in checkpoints" asks for, without a generator state to save.
(The CPU generator keeps 32 bits of a seed: two writes of a long run can share their bits by chance.
Each is still unbiased.)

Memory: the rounding works on the fp32 working copy in place, one block at a time; its temporaries are
a few bytes per element of one block, never the size of the parameter.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

ROUNDINGS = ("stochastic", "kahan", "nearest")
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Elements per block of random bits (4 MiB of int32): the granularity at which a shard and the whole
# tensor draw the same bits, and the bound on the rounding's temporaries.
BLOCK = 2**20

_BF16_MAX_BITS = 0x7F7F0000  # bf16's largest finite value, as fp32 bits
_MAGNITUDE_BITS = 0x7FFFFFFF
_FP16_MAX = torch.finfo(torch.float16).max
_LOW_16_BITS_CLEARED = -(2**16)  # 0xFFFF0000 as an int32
_FP32_EXPONENT_BIAS = 127
_FP16_MIN_EXPONENT = -14  # below 2^-14, fp16 values are subnormal: evenly spaced by 2^-24
_FP16_MANTISSA_BITS = 10


def check_rounding(rounding: str, owner: str) -> str:
    """``rounding`` if it is one of :data:`ROUNDINGS`; a ``ValueError`` naming ``owner`` otherwise."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"{owner}: rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}.")
    return rounding


def is_low_precision(tensor: Tensor) -> bool:
    """Whether ``tensor`` is bf16 or fp16, the dtypes whose updates need a careful write-back."""
    return tensor.dtype in LOW_PRECISION


@dataclass(frozen=True)
class WriteBack:
    """How the fp32 result of one update is written into its 16-bit parameter.

    Args:
        rounding: one of :data:`ROUNDINGS`.
        key: what identifies this write for stochastic rounding's bits: ``(seed, step, index)``.
        offset: the position of the local tensor's first element in the whole flattened parameter
            (non-zero for an FSDP2 shard).
        numel: the number of elements of the whole parameter.
        compensation: the Kahan compensation buffer (local, same dtype and shape as the parameter).
    """

    rounding: str = "nearest"
    key: tuple[int, ...] = ()
    offset: int = 0
    numel: int = 0
    compensation: Tensor | None = None

    def __call__(self, param: Tensor, work: Tensor) -> None:
        """Write ``work`` (fp32, same shape; overwritten) into ``param`` (bf16/fp16, local)."""
        if self.rounding == "stochastic":
            stochastic_round_(param, work, key=self.key, offset=self.offset, numel=self.numel or param.numel())
        elif self.rounding == "kahan":
            assert self.compensation is not None, "Kahan write-back needs its compensation buffer"
            kahan_write_back_(param, work, self.compensation)
        else:
            param.copy_(work)


def kahan_write_back_(param: Tensor, work: Tensor, compensation: Tensor) -> None:
    """``param <- nearest(work + c)``, ``c <- (work + c) - param``: what a write loses is added to the next.

    The update the rule made (``work - param``) and the compensation are summed in fp32 with the old
    value, the sum is rounded to nearest, and the difference, exact in fp32, is kept (in the parameter's
    dtype) for the next write: the parameter plus its compensation carries about twice the precision of
    the parameter alone. ``work`` is overwritten.
    """
    work.add_(compensation)
    param.copy_(work)
    compensation.copy_(work.sub_(param))


def stochastic_round_(param: Tensor, work: Tensor, *, key: tuple[int, ...], offset: int = 0, numel: int | None = None) -> None:
    """``param <- round(work)``, rounded up or down at random so that ``E[param] = work`` exactly.

    ``work`` (fp32, contiguous, the shape of ``param``) is overwritten. Infinities and NaNs stay what
    they are, and a finite value never becomes infinite where round-to-nearest would not: one just above
    the dtype's largest finite value saturates to it.

    Args:
        param: the bf16 or fp16 tensor to write.
        work: its new value in fp32.
        key: identifies the write; the random bits are a function of ``key`` and the elements' positions.
        offset: the position of ``param``'s first element in the whole flattened tensor it is a shard of.
        numel: the number of elements of that whole tensor (default: ``param.numel()``).
    """
    if param.dtype not in LOW_PRECISION:
        raise TypeError(f"stochastic rounding writes bf16 or fp16 tensors, got {param.dtype}")
    source = work.view(-1)
    target = param.view(-1)
    total = param.numel() if numel is None else numel
    round_block = _round_to_bf16 if param.dtype == torch.bfloat16 else _round_to_fp16
    random_bits = 16 if param.dtype == torch.bfloat16 else 24
    end = offset + target.numel()
    for block_start in range(offset - offset % BLOCK, end, BLOCK):
        start, stop = max(block_start, offset), min(block_start + BLOCK, end)
        bits = _block_bits(key, block_start, min(BLOCK, total - block_start), random_bits, param.device)
        bits = bits[start - block_start : stop - block_start]
        target[start - offset : stop - offset].copy_(round_block(source[start - offset : stop - offset], bits))


def _block_bits(key: tuple[int, ...], block_start: int, size: int, random_bits: int, device: torch.device) -> Tensor:
    """``size`` uniform int32 in ``[0, 2^random_bits)``: the bits of one block, a function of ``key`` and the block.

    Drawn as 64-bit words, each split into 16-bit lanes (bf16 needs 16 bits) or 32-bit lanes (fp16
    needs 24): a generator call per word, not per element, halves to quarters the cost of the draw.
    The whole block is drawn even when only part of it is needed, so the bits of an element do not
    depend on which part of the tensor the caller holds.
    """
    seed = int.from_bytes(hashlib.blake2b(repr((*key, block_start)).encode(), digest_size=8).digest(), "little")
    generator = _generator(device)
    generator.manual_seed(seed)
    lane = torch.int16 if random_bits <= 16 else torch.int32
    per_word = 64 // torch.iinfo(lane).bits
    words = torch.empty(-(-size // per_word), dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    return words.view(lane)[:size].to(torch.int32).bitwise_and_(2**random_bits - 1)


@functools.cache
def _generator(device: torch.device) -> torch.Generator:
    """One generator per device, re-seeded for every block (so it holds no state worth saving)."""
    return torch.Generator(device=device)


def _round_to_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """Stochastic rounding to bf16 by torchao's bit trick; ``x`` (fp32) is overwritten and returned.

    A bf16 value is an fp32 value whose low 16 bits are zero. Adding 16 uniform random bits to the
    low half of the fp32 pattern carries into the high half with probability ``low / 2^16``: truncating
    afterwards rounds the magnitude up with exactly the probability that makes the rounding unbiased
    (the sign bit is apart, so this is rounding away from / towards zero). Values beyond bf16's largest
    finite value, infinities and NaNs get no random bits: they are truncated, which keeps them
    (a quiet NaN keeps its quiet bit) and saturates a finite value to the largest one.
    """
    pattern = x.view(torch.int32)
    in_range = pattern.bitwise_and(_MAGNITUDE_BITS).le_(_BF16_MAX_BITS)  # 1 where |x| <= bf16's max, else 0
    pattern.addcmul_(bits, in_range).bitwise_and_(_LOW_16_BITS_CLEARED)
    return x


def _round_to_fp16(x: Tensor, bits: Tensor) -> Tensor:
    """Stochastic rounding to fp16, exactly unbiased; ``bits`` holds 24 random bits per element.

    fp16 is not a truncation of fp32 (its exponent range is narrower, and below 2^-14 its values are
    evenly spaced by 2^-24), so the spacing of fp16 values around ``|x|`` is computed from ``x``'s
    exponent: ``s = 2^(max(e, -14) - 10)``. ``|x| / s`` is exact (a power-of-two scaling); its integer
    part is the fp16 value towards zero, its fraction ``f`` the probability of rounding away from zero,
    taken when ``bits < f * 2^24``. ``f`` is a multiple of 2^-24 for every ``|x| >= 2^-25`` (every
    normal fp16 value and most subnormals), so the probability is exact there; below, the rounding
    picks 0 or 2^-24 with a probability exact to 2^-24.
    """
    nearest = x.to(torch.float16)
    exponent = (x.view(torch.int32) >> 23).bitwise_and_(0xFF)  # biased
    exponent.clamp_(min=_FP16_MIN_EXPONENT + _FP32_EXPONENT_BIAS).sub_(_FP16_MANTISSA_BITS)
    spacing = exponent.bitwise_left_shift_(23).view(torch.float32)  # 2^(e - 10), built from its bits: exact
    units = x.abs().div_(spacing)
    rounded = units.trunc()
    away = bits.to(torch.float32).lt_(units.sub_(rounded).mul_(2.0**24))
    rounded.add_(away).mul_(spacing).clamp_(max=_FP16_MAX)
    rounded = torch.copysign(rounded, x)  # keeps the sign of zero
    return torch.where(nearest.isfinite(), rounded, nearest.to(torch.float32))
