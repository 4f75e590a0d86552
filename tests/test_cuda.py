"""The main contracts on a CUDA device (skipped without one; ``benchmarks/gpu_check.sh`` runs them on a GPU).

The rest of the suite runs on CPU. The code has no device branches, so these check what could differ on
a GPU: the hash behind stochastic rounding (the same bits as on CPU), bf16 kernels, the compiled (Triton)
kernels against eager, and Lightning's GPU accelerator.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import batches, tiny_llama
from lightning.pytorch import Trainer

from lomo_lightning import AdaLomo, FusedUpdater, Lomo
from lomo_lightning.optim.rounding import stochastic_round_

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)"),
]
CUDA = torch.device("cuda")


def on_cuda(data):
    return [{k: v.to(CUDA) for k, v in batch.items()} for batch in data]


@pytest.mark.parametrize("rounding", ["stochastic", "kahan", "nearest"])
@pytest.mark.parametrize("rule", [Lomo, AdaLomo], ids=["lomo", "adalomo"])
def test_fused_equals_unfused_bit_for_bit_in_bf16_on_cuda(rule, rounding):
    reference = tiny_llama(dtype=torch.bfloat16).to(CUDA)
    fused = copy.deepcopy(reference)
    make = lambda params: rule(params, lr=1e-2, rounding=rounding, seed=3)  # noqa: E731
    data = on_cuda(batches(3))
    optimizer = make(reference.parameters())
    for batch in data:
        reference(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    updater = FusedUpdater(fused, make(fused.parameters()))
    for batch in data:
        updater.backward(fused(**batch).loss)
    for p, q in zip(reference.parameters(), fused.parameters()):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))


def test_stochastic_rounding_on_cuda_is_unbiased_and_follows_the_seed():
    values = torch.linspace(1.0, 2.0, 257, device=CUDA)[1:-1]  # between bf16 neighbours 2^-7 apart
    repeats = 4096
    rounded = torch.empty(repeats * values.numel(), dtype=torch.bfloat16, device=CUDA)
    stochastic_round_(rounded, values.repeat(repeats), key=(0, 1, 2))
    again = torch.empty_like(rounded)
    stochastic_round_(again, values.repeat(repeats), key=(0, 1, 2))
    assert torch.equal(rounded.view(torch.int16), again.view(torch.int16)), "the same key draws the same bits"
    mean = rounded.float().view(repeats, -1).mean(0)
    assert (mean - values).abs().max() < 6 * 2**-7 / (2 * repeats**0.5), "unbiased within 6 sigma"


def test_lightning_on_gpu_with_bf16_true_trains_like_the_plain_loop():
    from test_strategy import TinyLM, assert_same_parameters, loader, plain_loop

    data = batches(3)
    module = TinyLM(tiny_llama())
    expected = tiny_llama().to(CUDA, torch.bfloat16)  # what precision="bf16-true" does to the module
    trainer = Trainer(accelerator="gpu", devices=1, strategy="lomo", precision="bf16-true", max_steps=3, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader(data))
    plain_loop(expected, on_cuda(data), forward_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in module.model.parameters())
    assert_same_parameters(module.model, expected)


def test_offloaded_activations_train_the_same_and_leave_the_device_with_less():
    """Activation offloading on a GPU (pinned host memory, a side stream): the same parameters bit for bit as
    without it, and a lower peak of device memory (each checkpointed block's input waits on the host)."""
    from lomo_lightning.activations import ActivationOffloading

    data = on_cuda(batches(3, batch_size=32, seq_len=64))  # 8 block inputs of 256 KiB: more than the logits
    peaks, models = [], []
    for offload in (False, True):
        torch.manual_seed(0)
        model = tiny_llama(layers=8).to(CUDA)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        updater = FusedUpdater(model, AdaLomo(model.parameters(), lr=1e-2))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for batch in data:
            with ActivationOffloading(min_bytes=0) if offload else contextlib.nullcontext():
                loss = model(**batch).loss
            updater.backward(loss)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        models.append(model)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
    assert peaks[1] < peaks[0], peaks


@pytest.mark.compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_draws_the_cpu_bits_on_cuda_eager_and_compiled(dtype):
    values = torch.randn(3 * 2**20 + 17, generator=torch.Generator().manual_seed(0)) * 1e-2
    cpu = torch.empty(values.shape, dtype=dtype)
    stochastic_round_(cpu, values.clone(), key=(1, 2, 3), offset=5)
    for compile in (False, True):
        cuda = torch.empty(values.shape, dtype=dtype, device=CUDA)
        stochastic_round_(cuda, values.to(CUDA), key=(1, 2, 3), offset=5, compile=compile)
        assert torch.equal(cuda.cpu().view(torch.int16), cpu.view(torch.int16)), f"compile={compile}"


@pytest.mark.compiled
@pytest.mark.parametrize("rule", [Lomo, AdaLomo], ids=["lomo", "adalomo"])
def test_compiled_rules_on_cuda_match_eager(rule):
    start = tiny_llama(dtype=torch.bfloat16).to(CUDA)
    data = on_cuda(batches(3))
    finals = []
    for compile in (False, True):
        model = copy.deepcopy(start)
        updater = FusedUpdater(model, rule(model.parameters(), lr=1e-2, weight_decay=0.1, seed=3, compile=compile))
        for batch in data:
            updater.backward(model(**batch).loss)
        finals.append([p.detach() for p in model.parameters()])
    for p, q in zip(*finals):
        if rule is Lomo:
            assert torch.equal(p.view(torch.int16), q.view(torch.int16)), "LOMO: compiled = eager bit for bit"
        else:  # sums in another order: at most one bf16 unit apart
            from test_kernels import units_apart

            assert int(units_apart(p, q).max()) <= 1
