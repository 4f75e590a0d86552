"""The fake-tensor estimate of ``benchmarks/memory_scale.py`` is MemTracker's measurement on real tensors.

Under ``FakeTensorMode`` a tensor has a shape, a dtype and a storage size but no data. MemTracker counts
storage bytes, so the peak of a step on fake tensors must equal, byte for byte, the peak of the same step on
real ones. Checked on a tiny fp16 Llama for the standard step with fp32 master weights, a fused rule behind a
selection (half fine-tuning), fused AdaLomo on FSDP2 shards over 8 fake ranks, and sparse fine-tuning, whose
backward samples its gradient in a custom operator (the fake implementation allocates what the real one returns).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama

pytest.importorskip("torch.distributed._tools.fsdp2_mem_tracker")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_scale.py"


@pytest.fixture(scope="module")
def memory_scale():
    sys.path.insert(0, str(SCRIPT.parent))  # its harness, as when it runs as a script
    spec = importlib.util.spec_from_file_location("memory_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(SCRIPT.parent))


@pytest.mark.parametrize(
    "method, world",
    [("adamw", 1), ("hft", 1), ("adalomo", 8), ("sft", 1)],
    ids=["adamw-master-weights", "hft-adalomo-fused", "adalomo-fsdp2-8-ranks", "sft-sm3-fused"],
)
def test_fake_tensor_peak_equals_the_real_one(memory_scale, method, world):
    config = tiny_llama().config  # 2 blocks, grouped-query attention, untied embeddings
    config.use_cache = False
    setting = memory_scale.Setting(batch=2, seq=32, dtype="float16", world=world)

    real = memory_scale.measure(config, method, setting, fake=False)
    fake = memory_scale.measure(config, method, setting, fake=True)

    assert fake["peak_by_category_bytes"] == real["peak_by_category_bytes"]
    assert fake["peak_bytes"] > 0
