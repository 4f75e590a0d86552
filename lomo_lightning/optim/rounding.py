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
starts in the middle, a compiled kernel does a whole tensor at once and the eager reference a block at a
time. So the bits are not drawn from a generator. They are a pure function of what the write is: the
random bits of element ``i`` (its position in the whole, global, flattened tensor) of the write at step
``t`` of the parameter at position ``index`` in the optimizer's param groups are a counter-based hash,
``lowbias32(i ^ k)`` (C. Wellons' 32-bit finalizer, a bijection of 32-bit words with good avalanche, in
the family of murmur3's ``fmix32``), where ``k`` is 32 bits of a hash of ``(seed, t, index)``. The hash
is integer arithmetic on int32 words whose products wrap mod 2^32 (:func:`random_bits`), so eager torch,
torch.compile (C++ on CPU, Triton on CUDA) and every device compute the same bits. The seed is in the
param group and ``t`` in the optimizer state, so a checkpoint holds all there is: a resumed run is
bit-identical to an uninterrupted one, fused equals unfused, compiled equals eager, and because the
positions are global, a shard of an FSDP2 parameter draws the same bits for its elements as the whole
tensor does on one process (and DDP replicas draw the same bits, so they stay equal). bf16 takes the
hash's top 16 bits, fp16 its top 24. (``k`` has 32 bits: two writes of a long run can share their bits
by chance. Each is still unbiased.)

Memory: the eager rounding works on the fp32 working copy one block of :data:`BLOCK` elements at a
time; its temporaries are a few bytes per element of one block, never the size of the parameter. The
compiled write (``compile=True``) is one fused pass with no temporary at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lomo_lightning.optim.compiling import compiled

ROUNDINGS = ("stochastic", "kahan", "nearest")
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Elements per block of the eager write (8 MiB of int64 positions): the bound on its temporaries.
BLOCK = 2**20

_BF16_MAX_BITS = 0x7F7F0000  # bf16's largest finite value, as fp32 bits
_MAGNITUDE_BITS = 0x7FFFFFFF
_FP16_MAX = torch.finfo(torch.float16).max
_LOW_16_BITS_CLEARED = -(2**16)  # 0xFFFF0000 as an int32
_FP32_EXPONENT_BIAS = 127
_FP16_MIN_EXPONENT = -14  # below 2^-14, fp16 values are subnormal: evenly spaced by 2^-24
_FP16_MANTISSA_BITS = 10
_SIGN_32 = -(2**31)  # the sign bit of an int32
_GOLDEN_32 = 0x9E3779B9  # spreads the high word of a position (tensors beyond 2^32 elements)


def check_rounding(rounding: str, owner: str) -> str:
    """``rounding`` if it is one of :data:`ROUNDINGS`; a ``ValueError`` naming ``owner`` otherwise."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"{owner}: rounding must be one of {', '.join(map(repr, ROUNDINGS))}, got {rounding!r}.")
    return rounding


def is_low_precision(tensor: Tensor) -> bool:
    """Whether ``tensor`` is bf16 or fp16, the dtypes whose updates need a careful write-back."""
    return tensor.dtype in LOW_PRECISION


class Write(NamedTuple):
    """One write-back as :func:`write_` takes it: what a rule makes once per update (its hot path).

    ``key``: under stochastic rounding ``[k, offset]`` (int64), the write's :func:`key_word` and the
    position of the local tensor's first element in the whole flattened parameter (non-zero for an FSDP2
    shard); ``compensation``: the flat Kahan buffer; ``compile``: one compiled pass rather than eager
    (bit-identical).
    """

    rounding: str = "nearest"
    key: Tensor | None = None
    compensation: Tensor | None = None
    compile: bool = False

    def __call__(self, param: Tensor, work: Tensor) -> None:
        """Write ``work`` (fp32, the shape of ``param``; may be overwritten) into ``param`` (bf16/fp16, local)."""
        (compiled(write_) if self.compile else write_)(param.view(-1), work.view(-1), self.rounding, self.key, self.compensation)


@dataclass(frozen=True)
class WriteBack:
    """How the fp32 result of one update is written into its 16-bit parameter, described (:meth:`write` makes it).

    Args:
        rounding: one of :data:`ROUNDINGS`.
        key: what identifies this write for stochastic rounding's bits: ``(seed, step, index)``.
        offset: the position of the local tensor's first element in the whole flattened parameter
            (non-zero for an FSDP2 shard).
        numel: the number of elements of the whole parameter (kept for callers; the bits do not need it).
        compensation: the Kahan compensation buffer (local, same dtype and shape as the parameter).
        compile: write with the compiled kernel (one fused pass) rather than eagerly; bit-identical.
    """

    rounding: str = "nearest"
    key: tuple[int, ...] = ()
    offset: int = 0
    numel: int = 0
    compensation: Tensor | None = None
    compile: bool = False

    def __call__(self, param: Tensor, work: Tensor) -> None:
        """Write ``work`` (fp32, same shape; may be overwritten) into ``param`` (bf16/fp16, local)."""
        self.write(param.device)(param, work)

    def write(self, device: torch.device | str) -> Write:
        """This write-back as the kernels take it, its key on ``device``."""
        if self.rounding == "stochastic":
            return Write(self.rounding, torch.tensor([key_word(self.key), self.offset], dtype=torch.int64, device=device), compile=self.compile)
        if self.rounding == "kahan":
            assert self.compensation is not None, "Kahan write-back needs its compensation buffer"
            return Write(self.rounding, compensation=self.compensation.view(-1), compile=self.compile)
        return Write(self.rounding, compile=self.compile)


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


def stochastic_round_(
    param: Tensor, work: Tensor, *, key: tuple[int, ...], offset: int = 0, numel: int | None = None, compile: bool = False
) -> None:
    """``param <- round(work)``, rounded up or down at random so that ``E[param] = work`` exactly.

    ``work`` (fp32, contiguous, the shape of ``param``) may be overwritten. Infinities and NaNs stay what
    they are, and a finite value never becomes infinite where round-to-nearest would not: one just above
    the dtype's largest finite value saturates to it.

    Args:
        param: the bf16 or fp16 tensor to write.
        work: its new value in fp32.
        key: identifies the write; the random bits are a function of ``key`` and the elements' positions.
        offset: the position of ``param``'s first element in the whole flattened tensor it is a shard of.
        numel: the number of elements of that whole tensor (accepted for compatibility; the bits of an
            element depend on its position only, not on the tensor's size).
        compile: one compiled pass over the whole tensor instead of eager blocks (bit-identical).
    """
    if param.dtype not in LOW_PRECISION:
        raise TypeError(f"stochastic rounding writes bf16 or fp16 tensors, got {param.dtype}")
    WriteBack("stochastic", key=key, offset=offset, compile=compile)(param, work)


def key_word(key: tuple[int, ...]) -> int:
    """The 32-bit word ``k`` of a write's key ``(seed, step, index)`` that its bits are hashed with."""
    return int.from_bytes(hashlib.blake2b(repr(tuple(key)).encode(), digest_size=4).digest(), "little")


def random_bits(positions: Tensor, key: Tensor, count: int) -> Tensor:
    """``count`` (<= 31) uniform random bits for each element at ``positions`` (int64, >= 0): a pure function.

    ``key[0]`` is the write's :func:`key_word`. The position's low word is xor-ed with it, its high word
    (non-zero beyond 2^32 elements) spread by a golden-ratio multiplier, and the result hashed by C. Wellons'
    ``lowbias32`` (hash-prospector: a 32-bit bijection whose output bits flip ~50% per input bit); the top
    ``count`` bits are returned (int32 in ``[0, 2^count)``). :func:`write_` makes the same word from int32
    arithmetic alone for a tensor of fewer than 2^31 elements.
    """
    return _lowbias32(_words(positions, key), count)


def _words(positions: Tensor, key: Tensor) -> Tensor:
    """The int32 word :func:`random_bits` hashes for each int64 position: its low word xor the key word xor its
    high word spread by the golden-ratio multiplier."""
    return positions.bitwise_xor(key[0]).bitwise_xor((positions >> 32) * _GOLDEN_32).to(torch.int32)


def _lowbias32(x: Tensor, count: int) -> Tensor:
    """The top ``count`` bits of C. Wellons' ``lowbias32`` of the int32 words ``x``.

    On int32 words, twice as many to a vector register as int64: a product of two int32 words keeps the low
    32 bits of the true product (two's complement wraps: in torch's kernels, in CUDA, in the vector
    instructions inductor emits), which is ``lowbias32``'s product mod 2^32; shifts are made logical by
    masking off the copies of the sign bit that an arithmetic shift brings in.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - 2**32)  # the multiplier as an int32 word
    x = x ^ ((x >> 16) & 0xFFFF)
    return (x >> (32 - count)) & ((1 << count) - 1)


def write_(param: Tensor, work: Tensor, rounding: str, key: Tensor | None, compensation: Tensor | None) -> None:
    """``param <- rounding(work)`` on flat tensors: every write-back, eager or inside a compiled kernel.

    ``key`` is ``[k, offset]`` (:class:`Write`) under stochastic rounding, ``compensation`` the flat Kahan
    buffer. Run eagerly, ``work`` may be overwritten and a stochastic write of more than :data:`BLOCK`
    elements goes block by block (its temporaries stay a few bytes per element of one block); compiled, it is
    one pass that only reads ``work`` and has no temporary. Both write the same bits.

    bf16 by torchao's bit trick: a bf16 value is an fp32 value whose low 16 bits are zero. Adding 16 uniform
    random bits to the low half of the fp32 pattern carries into the high half with probability
    ``low / 2^16``: truncating afterwards rounds the magnitude up with exactly the probability that makes the
    rounding unbiased (the sign bit is apart, so this is rounding away from / towards zero). Values beyond
    bf16's largest finite value, infinities and NaNs get no random bits: they are truncated, which keeps them
    (a quiet NaN keeps its quiet bit) and saturates a finite value to the largest one.
    """
    eager = not torch.compiler.is_compiling()
    if rounding == "stochastic":
        assert key is not None
        if eager and param.numel() > BLOCK:
            for start in range(0, param.numel(), BLOCK):
                block_key = key + torch.tensor([0, start], dtype=torch.int64, device=key.device)
                write_(param[start : start + BLOCK], work[start : start + BLOCK], rounding, block_key, None)
            return
        if param.numel() < 2**31:
            # the word random_bits hashes, in int32 (int64 arithmetic vectorizes poorly, and so do conversions of a
            # tensor between integer widths): the low word of a position is i + low(offset) mod 2^32 (an int32 sum
            # wraps), its high word high(offset) plus the carry out of that sum (the sum is below low(offset) as
            # unsigned words: compared with their sign bits flipped, as signed ones)
            offset_low = (key[1] & 0xFFFFFFFF).to(torch.int32)  # a scalar: wraps to the low word's bits
            low = torch.arange(param.numel(), dtype=torch.int32, device=param.device) + offset_low
            carry = ((low ^ _SIGN_32) < (offset_low ^ _SIGN_32)).to(torch.int32)
            high = (carry + (key[1] >> 32).to(torch.int32)) * (_GOLDEN_32 - 2**32)  # the multiplier as an int32 word
            words = low ^ key[0].to(torch.int32) ^ high
        else:  # beyond int32 positions: the same word from int64 ones
            words = _words(torch.arange(param.numel(), dtype=torch.int64, device=param.device) + key[1], key)
        if param.dtype == torch.bfloat16:
            pattern = work.view(torch.int32)
            bits = _lowbias32(words, 16)
            # `<`, not `<=`: inductor's AVX2 code inverts integer `<=`, `>=` and `!=` (torch 2.13; `<`, `>`, `==` hold)
            in_range = (pattern & _MAGNITUDE_BITS) < _BF16_MAX_BITS + 1
            rounded = torch.where(in_range, pattern + bits, pattern) & _LOW_16_BITS_CLEARED
            param.copy_(rounded.view(torch.float32).to(torch.bfloat16))  # exact: the low 16 bits are zero
        else:
            param.copy_(_round_to_fp16(work, _lowbias32(words, 24)))
    elif rounding == "kahan":
        assert compensation is not None, "Kahan write-back needs its compensation buffer"
        if eager:
            kahan_write_back_(param, work, compensation)  # in place: no temporary
        else:
            total = work + compensation
            written = total.to(param.dtype)
            param.copy_(written)
            compensation.copy_(total - written)
    else:
        param.copy_(work)


def _round_to_fp16(x: Tensor, bits: Tensor) -> Tensor:
    """Stochastic rounding to fp16, exactly unbiased, from 24 random ``bits`` per element.

    fp16 is not a truncation of fp32 (its exponent range is narrower, and below 2^-14 its values are
    evenly spaced by 2^-24), so the spacing of fp16 values around ``|x|`` is computed from ``x``'s
    exponent: ``s = 2^(max(e, -14) - 10)``. ``|x| / s`` is exact (a power-of-two scaling); its integer
    part is the fp16 value towards zero, its fraction ``f`` the probability of rounding away from zero,
    taken when ``bits < f * 2^24``. ``f`` is a multiple of 2^-24 for every ``|x| >= 2^-25`` (every
    normal fp16 value and most subnormals), so the probability is exact there; below, the rounding
    picks 0 or 2^-24 with a probability exact to 2^-24.
    """
    nearest = x.to(torch.float16)
    exponent = ((x.view(torch.int32) >> 23) & 0xFF).clamp(min=_FP16_MIN_EXPONENT + _FP32_EXPONENT_BIAS) - _FP16_MANTISSA_BITS
    spacing = (exponent << 23).view(torch.float32)  # 2^(e - 10), built from its bits: exact
    units = x.abs() / spacing
    whole = units.trunc()
    away = bits.to(torch.float32) < (units - whole) * 2.0**24
    rounded = ((whole + away.to(torch.float32)) * spacing).clamp(max=_FP16_MAX)
    rounded = torch.copysign(rounded, x)  # keeps the sign of zero
    return torch.where(nearest.isfinite(), rounded.to(torch.float16), nearest)
