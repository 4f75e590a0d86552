"""Activation offloading: training with the saved tensors in host memory equals training without it, bit for bit.

On a CPU the host is the device, so the copies free nothing there (``"auto"`` keeps it off); forced on, the
same code path runs (every saved tensor copied out and back), which is what these tests check. What it saves
on a GPU is measured by ``benchmarks/memory_scale.py`` (fake tensors) and ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import batches, tiny_llama
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lomo_lightning import AdaLomo, FusedUpdater
from lomo_lightning.activations import ActivationOffloading, offloading_pays
from lomo_lightning.module import FusedCausalLMModule


def checkpointed_llama() -> torch.nn.Module:
    model = tiny_llama(layers=3)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@pytest.mark.parametrize("clip", [None, 0.5], ids=["plain", "two-pass-clipping"])
def test_fused_training_with_offloaded_activations_equals_training_without(clip):
    models = [checkpointed_llama(), checkpointed_llama()]
    updaters = [FusedUpdater(model, AdaLomo(model.parameters(), lr=1e-2), clip_grad_norm=clip) for model in models]
    offloaded = []
    for batch in batches(3, batch_size=2, seq_len=16):
        assert updaters[0].backward(models[0](**batch).loss)
        with ActivationOffloading(min_bytes=0) as offloading:
            loss = models[1](**batch).loss
        assert updaters[1].backward(loss)  # backward outside the context: the hooks travel with the saved tensors
        offloaded.append(offloading.offloaded_bytes)
    block_input = 2 * 16 * 32 * 4  # batch x tokens x hidden, fp32
    assert min(offloaded) >= 3 * block_input, "each checkpointed block's input must have gone to the host"
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


def test_parameters_and_tensors_under_min_bytes_are_not_copied():
    offloading = ActivationOffloading(min_bytes=64)
    weight, small, large = torch.nn.Parameter(torch.randn(4, 4)), torch.randn(15), torch.randn(16)
    assert offloading._pack(weight) is weight and offloading._pack(small) is small
    back = offloading._unpack(offloading._pack(large))
    assert back is not large and torch.equal(back, large)
    assert offloading.offloaded_bytes == large.numel() * 4


def test_the_module_option_trains_the_same_and_auto_is_off_on_a_cpu():
    data = batches(3)
    trained = {}
    for option in (True, False, "auto"):
        model = checkpointed_llama()
        module = FusedCausalLMModule(model, functools.partial(AdaLomo, lr=1e-2), activation_offloading=option)
        Trainer(accelerator="cpu", strategy="lomo", max_steps=3, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False).fit(module, DataLoader(data, batch_size=None))
        trained[option] = copy.deepcopy(module.model.state_dict())
    for name, value in trained[False].items():
        assert torch.equal(trained[True][name], value), name
    assert not offloading_pays(checkpointed_llama()), "a CPU's host memory is its device memory"
    with pytest.raises(ValueError, match="activation_offloading must be true, false or auto"):
        FusedCausalLMModule(tiny_llama(), functools.partial(AdaLomo, lr=1e-2), activation_offloading="yes")
