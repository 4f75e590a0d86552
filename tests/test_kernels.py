"""Compiled kernels (``compile=True``) against the eager reference, and the random bits they share.

The tests marked ``compiled`` compile kernels (seconds each, once per process); the others are cheap.
Contracts: the write-back, LOMO, SM3 and SFTAdamW are bit-identical compiled and eager; AdaLomo (which sums in another
order) is within one unit in the last place, nearly always equal; fused equals unfused with compilation
on; ``compile="auto"`` falls back to eager, saying so once, where the compiler fails.

The compiled group runs on ``LOMO_LIGHTNING_TEST_DEVICE`` (default ``cpu``; ``benchmarks/gpu_check.sh`` sets
``cuda``, where the kernels are Triton's): the contracts are the same on every device.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from conftest import batches, tiny_llama

from lomo_lightning import SM3, AdaLomo, FusedUpdater, Lomo, SFTAdamW
from lomo_lightning.optim import kernels
from lomo_lightning.optim import rounding as rounding_module
from lomo_lightning.optim.rounding import BLOCK, WriteBack, key_word, random_bits

LOW = [torch.bfloat16, torch.float16]
DEVICE = torch.device(os.environ.get("LOMO_LIGHTNING_TEST_DEVICE", "cpu"))  # where the compiled group runs


def model_on_device(**kwargs) -> torch.nn.Module:
    return tiny_llama(**kwargs).to(DEVICE)


def lowbias32(x: int) -> int:
    """The hash in plain Python integers (Wellons' hash-prospector, ``lowbias32``)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_random_bits_are_the_documented_hash_of_key_and_position():
    key = torch.tensor([key_word((7, 3, 11)), 0])
    positions = torch.tensor([0, 1, 2**31 - 1, 2**32 - 1, 2**32, 5 * 2**32 + 12345, 2**40 + 3])
    expected = []
    for position in positions.tolist():
        high = ((position >> 32) * 0x9E3779B9) & 0xFFFFFFFF
        expected.append(lowbias32((position & 0xFFFFFFFF) ^ int(key[0]) ^ high) >> 16)
    assert random_bits(positions, key, 16).tolist() == expected


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN (payloads are not part of the contract)."""
    same = a.view(torch.int16) == b.view(torch.int16)
    return bool((same | (a.isnan() & b.isnan())).all())


def awkward_values() -> torch.Tensor:
    """Every kind of fp32 input: random bit patterns (specials, subnormals, huge), small updates, edges."""
    patterns = torch.randint(-(2**31), 2**31 - 1, (50_000,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    small = torch.randn(BLOCK + 1000, generator=torch.Generator().manual_seed(1)) * 1e-2  # more than one eager block
    edges = torch.tensor([0.0, -0.0, torch.inf, -torch.inf, torch.nan, 1e-30, -1e-40, 65519.0, 65520.0, 3.39e38, 3.4e38])
    return torch.cat([patterns.view(torch.float32), small, edges])


@pytest.mark.compiled
@pytest.mark.parametrize(("dtype", "rounding"), [(torch.bfloat16, "stochastic"), (torch.float16, "stochastic"), (torch.bfloat16, "kahan")])
def test_compiled_write_back_equals_eager_bit_for_bit_also_on_a_shard(dtype, rounding):
    values = awkward_values().to(DEVICE)
    start = torch.randn(values.shape, generator=torch.Generator().manual_seed(2)).mul_(1e-3).to(DEVICE, dtype)

    def write(compile: bool, offset: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        param = torch.zeros(size, dtype=dtype, device=DEVICE)
        compensation = start[offset : offset + size].clone()
        write_back = WriteBack(rounding, key=(5, 6, 7), offset=offset, compensation=compensation, compile=compile)
        write_back(param, values[offset : offset + size].clone())
        return param, compensation

    eager, eager_compensation = write(False, 0, values.numel())
    compiled, compiled_compensation = write(True, 0, values.numel())
    assert equal_bits(eager, compiled)
    if rounding == "kahan":
        assert equal_bits(eager_compensation, compiled_compensation)
    # the second half of the tensor as a shard, compiled: the bits the whole tensor drew for its elements
    cut = values.numel() // 2 + 3
    shard, _ = write(True, cut, values.numel() - cut)
    assert equal_bits(shard, eager[cut:])


def avx2_available() -> bool:
    from torch._inductor import cpu_vec_isa

    return any(isa.bit_width() == 256 for isa in cpu_vec_isa.valid_vec_isa_list())


@pytest.mark.compiled
@pytest.mark.skipif(DEVICE.type != "cpu" or not avx2_available(), reason="inductor's AVX2 code needs a CPU with AVX2")
@pytest.mark.parametrize(("dtype", "rounding"), [(torch.bfloat16, "stochastic"), (torch.float16, "stochastic"), (torch.bfloat16, "kahan")])
def test_the_compiled_write_back_is_exact_in_avx2_code_too(dtype, rounding):
    """Inductor picks the widest vector ISA of the CPU; the suite's machine has AVX-512, many users' have AVX2 only,
    where inductor's integer ``<=`` selected the wrong branch of every ``where`` (torch 2.13)."""
    values = awkward_values()
    key = torch.tensor([key_word((5, 6, 7)), 11])
    start = torch.randn(values.shape, generator=torch.Generator().manual_seed(2)).mul_(1e-3).to(dtype)
    options = {"emulate_precision_casts": True, "cpp.simdlen": 256}
    avx2 = torch.compile(rounding_module.write_, dynamic=True, fullgraph=True, options=options)
    eager, compiled = torch.zeros(values.shape, dtype=dtype), torch.zeros(values.shape, dtype=dtype)
    eager_compensation, compiled_compensation = start.clone(), start.clone()
    rounding_module.write_(eager, values.clone(), rounding, key, eager_compensation)
    avx2(compiled, values, rounding, key, compiled_compensation)
    assert equal_bits(eager, compiled)
    assert equal_bits(eager_compensation, compiled_compensation)


@pytest.mark.compiled
@pytest.mark.parametrize("offset", [2**31 - 5, 2**32 - 5, 5 * 2**32 + 7], ids=["int31", "int32", "high-word"])
def test_a_shard_far_into_its_tensor_draws_the_documented_bits_eager_and_compiled(offset):
    """The write computes its positions' words in int32 (low word, carry, high word): across the 2^31 and 2^32
    boundaries they are the int64 positions' words that :func:`random_bits` documents."""
    key = torch.tensor([key_word((1, 2, 3)), offset], device=DEVICE)
    work = torch.randn(BLOCK + 17, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    bits = random_bits(torch.arange(work.numel(), device=DEVICE) + offset, key, 16)
    pattern = work.view(torch.int32)
    expected = ((pattern + bits) & -(2**16)).view(torch.float32).to(torch.bfloat16)  # finite, in range: the bit trick
    for compile in (False, True):
        param = torch.zeros(work.numel(), dtype=torch.bfloat16, device=DEVICE)
        WriteBack("stochastic", key=(1, 2, 3), offset=offset, compile=compile)(param, work.clone())
        assert equal_bits(param, expected), f"compile={compile}"


def train(model: torch.nn.Module, make, steps: int = 3, fused: bool = True) -> list[torch.Tensor]:
    optimizer = make(model.parameters())
    device = next(model.parameters()).device
    data = [{key: value.to(device) for key, value in batch.items()} for batch in batches(steps)]
    if fused:
        updater = FusedUpdater(model, optimizer)
        for batch in data:
            updater.backward(model(**batch).loss)
        updater.remove()
    else:
        for batch in data:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.compiled
@pytest.mark.parametrize(("dtype", "rounding"), [(torch.bfloat16, "stochastic"), (torch.float32, "nearest")], ids=["bf16", "fp32"])
def test_compiled_lomo_equals_eager_bit_for_bit_fused_and_unfused(dtype, rounding):
    start = model_on_device(dtype=dtype)

    def make(compile: bool):
        return lambda params: Lomo(params, lr=0.05, weight_decay=0.1, rounding=rounding, seed=3, compile=compile)

    eager = train(copy.deepcopy(start), make(False))
    compiled = train(copy.deepcopy(start), make(True))
    unfused = train(copy.deepcopy(start), make(True), fused=False)
    assert all(torch.equal(p, q) for p, q in zip(eager, compiled))
    assert all(torch.equal(p, q) for p, q in zip(compiled, unfused))
    assert not all(torch.equal(p, q) for p, q in zip(compiled, start.parameters())), "the steps must move the weights"


def sparse_values(seed: int) -> torch.nn.Parameter:
    """Sparse fine-tuning's values: fp32 entries of a 12 x 10 matrix (``matrix_entries``), not in index order."""
    values = torch.nn.Parameter((torch.randn(40, generator=torch.Generator().manual_seed(seed)) * 1e-2).to(DEVICE))
    indices = torch.randperm(120, generator=torch.Generator().manual_seed(seed))[:40].to(DEVICE)
    values.matrix_entries = lambda: (indices, (12, 10))
    return values


@pytest.mark.compiled
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
@pytest.mark.parametrize("rule", ["sm3", "sft_adamw"])
def test_compiled_sm3_and_sft_adamw_equal_eager_bit_for_bit_on_matrices_vectors_and_sparse_values(rule, rounding):
    def make(compile: bool):
        if rule == "sm3":
            return lambda params: SM3(params, lr=1e-2, momentum=0.5, weight_decay=0.1, rounding=rounding, seed=3, compile=compile)
        return lambda params: SFTAdamW(params, lr=1e-2, weight_decay=0.1, rounding=rounding, seed=3, compile=compile)

    # a bf16 model (matrices and vectors, 16-bit write-back), fused
    start = model_on_device(dtype=torch.bfloat16)
    runs = [train(copy.deepcopy(start), make(compile)) for compile in (False, True)]
    assert all(torch.equal(p.view(torch.int16), q.view(torch.int16)) for p, q in zip(*runs))
    assert not all(torch.equal(p, q) for p, q in zip(runs[0], start.parameters())), "the steps must move the weights"
    if rounding == "kahan":
        return  # the sparse values below are fp32: no write-back, one rounding covers them
    # sparse fine-tuning's fp32 values, unfused (SM3 keeps the accumulators of the whole matrix), with the state
    finals = []
    for compile in (False, True):
        values = sparse_values(0)
        optimizer = make(compile)([values])
        for step in range(3):
            values.grad = torch.randn(40, generator=torch.Generator().manual_seed(10 + step)).to(DEVICE)
            optimizer.step()
        finals.append([values.detach(), *(v for v in optimizer.state[values].values() if isinstance(v, torch.Tensor))])
    assert all(torch.equal(p, q) for p, q in zip(*finals))


def units_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between ``a`` and ``b`` (same sign assumed near 0)."""
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    ordered = [x.view(bits).long() for x in (a, b)]
    ordered = [torch.where(x < 0, -(x & (2 ** (8 * a.element_size() - 1) - 1)), x) for x in ordered]  # sign-magnitude
    return (ordered[0] - ordered[1]).abs()


@pytest.mark.compiled
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_compiled_adalomo_is_within_one_unit_of_eager_and_fused_equals_unfused(rounding):
    start = model_on_device(dtype=torch.bfloat16)

    def make(compile: bool):
        return lambda params: AdaLomo(params, lr=1e-2, weight_decay=0.1, rounding=rounding, seed=3, compile=compile)

    eager = train(copy.deepcopy(start), make(False), steps=5)
    compiled = train(copy.deepcopy(start), make(True), steps=5)
    unfused = train(copy.deepcopy(start), make(True), steps=5, fused=False)
    apart = torch.cat([units_apart(p, q).flatten() for p, q in zip(eager, compiled)])
    assert apart.max() <= 1
    assert (apart == 0).double().mean() >= 0.999
    assert all(torch.equal(p, q) for p, q in zip(compiled, unfused)), "fused = unfused, both compiled"


def test_auto_falls_back_to_eager_with_one_logged_line_where_the_compiler_fails(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nmore detail")

    monkeypatch.setenv(kernels.COMPILE_ENV, "auto")
    monkeypatch.setattr(torch, "compile", broken)
    kernels.compiler_works.cache_clear()
    kernels.compiled.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            assert kernels.use_compile("auto") is False
            assert kernels.use_compile("auto") is False  # probed once
        assert [r.getMessage() for r in caplog.records] == [
            "lomo_lightning: torch.compile does not work on cpu here (RuntimeError: no compiler here); the update rules run eagerly."
        ]
        assert kernels.use_compile(False) is False and kernels.use_compile(True) is True
        # an eager rule under "auto" still trains
        model = tiny_llama(dtype=torch.bfloat16)
        before = [p.detach().clone() for p in model.parameters()]
        after = train(model, lambda params: AdaLomo(params, lr=1e-2), steps=1)
        assert not all(torch.equal(p, q) for p, q in zip(before, after))
    finally:
        kernels.compiler_works.cache_clear()
        kernels.compiled.cache_clear()


def test_compile_must_be_true_false_or_auto():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="AdaLomo: compile must be True, False or 'auto', got 'yes'"):
        AdaLomo(params, compile="yes")
    with pytest.raises(ValueError, match="Lomo: compile must be True, False or 'auto', got 1"):
        Lomo(params, compile=1)


def allocation_peak(step) -> int:
    """The most bytes ``step`` held allocated at once beyond what existed before it, from the profiler's
    allocator events (MemTracker, a dispatch mode, cannot look inside a compiled graph; the allocator can);
    on CUDA from the caching allocator's peak."""
    from torch.profiler import ProfilerActivity, profile

    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


@pytest.mark.compiled
@pytest.mark.parametrize("rule", [Lomo, AdaLomo, SM3, SFTAdamW], ids=["lomo", "adalomo", "sm3", "sft_adamw"])
def test_compiled_step_holds_no_more_memory_than_eager(rule):
    torch.manual_seed(0)
    width = 512
    start = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(4)]).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, width, dtype=torch.bfloat16).to(DEVICE)
    peaks = {}
    for compile in (False, True):
        model = copy.deepcopy(start)
        updater = FusedUpdater(model, rule(model.parameters(), lr=1e-3, compile=compile))
        updater.backward(model(x).float().square().mean())  # state made, kernels compiled
        peaks[compile] = allocation_peak(lambda: updater.backward(model(x).float().square().mean()))
    working_copy = width * width * 4
    assert peaks[False] >= working_copy, "the eager step's fp32 working copy must show: the measure sees temporaries"
    assert peaks[True] <= 1.01 * peaks[False], peaks


@pytest.mark.compiled
def test_a_stock_rule_under_the_engine_writes_back_compiled_bit_for_bit():
    start = model_on_device(dtype=torch.bfloat16)
    finals = []
    for compile in (False, True):
        model = copy.deepcopy(start)
        updater = FusedUpdater(model, torch.optim.AdamW(model.parameters(), lr=1e-3), rounding="stochastic", seed=1, compile=compile)
        for batch in batches(2):
            updater.backward(model(**{key: value.to(DEVICE) for key, value in batch.items()}).loss)
        finals.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(p.view(torch.int16), q.view(torch.int16)) for p, q in zip(*finals))
    with pytest.raises(ValueError, match="FusedUpdater: compile must be True, False or 'auto'"):
        FusedUpdater(start, torch.optim.SGD(start.parameters(), lr=1e-3), compile="always")


def test_auto_compiles_large_rules_where_the_compiler_works_and_follows_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.COMPILE_ENV, "auto")
    monkeypatch.setattr(kernels, "compiler_works", lambda device_type="cpu": True)
    assert kernels.use_compile("auto", "cpu", kernels.AUTO_MIN_ELEMENTS) is True
    assert kernels.use_compile("auto", "cpu", kernels.AUTO_MIN_ELEMENTS - 1) is False, "a small rule stays eager"
    small = [torch.nn.Parameter(torch.zeros(4, 4))]
    assert AdaLomo(small).compiles(small[0]) is False and AdaLomo(small, compile=True).compiles(small[0]) is True
    monkeypatch.setenv(kernels.COMPILE_ENV, "1")
    assert AdaLomo(small).compiles(small[0]) is True
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    assert kernels.use_compile("auto", "cpu", kernels.AUTO_MIN_ELEMENTS) is False
    assert kernels.use_compile(True, "cpu", 1) is True, "an explicit choice is not overridden"
