"""FSDP2's unit chosen for memory: the largest (a block, else a projection) whose gathered parameters fit the budget.

The choice is checked on the real shapes of LLaMA-7B and -65B (built on the meta device, no memory), and the
sharding it leads to on a tiny Llama over a fake process group. That training with a unit per projection
equals one process is checked with the other sharded cases (``tests/test_distributed.py``, ``proj``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_llama

from lomo_lightning.strategies import LomoFSDPStrategy
from lomo_lightning.strategies.fsdp import shard_transformers
from lomo_lightning.strategies.fsdp_units import GATHERED_FRACTION, PREFETCH, choose_unit, gathered_bytes, units_of

GIB = 2**30


def llama_blocks(hidden: int, intermediate: int, heads: int, layers: int = 2) -> list[torch.nn.Module]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=heads)
    with torch.device("meta"):
        return [LlamaDecoderLayer(config, index) for index in range(layers)]


LLAMA_7B = dict(hidden=4096, intermediate=11008, heads=32)
LLAMA_65B = dict(hidden=8192, intermediate=22016, heads=64)


@pytest.mark.parametrize(
    "shape, card_gib, expected",
    [
        (LLAMA_65B, 24, "projection"),  # LOMO's 65B on 8 x RTX 3090: a 1.5 GiB block does not fit
        (LLAMA_65B, 80, "block"),
        (LLAMA_7B, 24, "block"),
    ],
    ids=["65b-24gib", "65b-80gib", "7b-24gib"],
)
def test_auto_takes_the_largest_unit_that_fits_a_share_of_the_card(shape, card_gib, expected):
    blocks = llama_blocks(**shape)
    budget = int(GATHERED_FRACTION * card_gib * GIB)
    assert choose_unit(blocks, "auto", budget, torch.float16) == expected


def test_auto_budget_boundary_is_the_unit_at_work_plus_the_prefetched_ones():
    blocks = llama_blocks(**LLAMA_7B)
    block = gathered_bytes(blocks[0], torch.bfloat16)
    assert block == 202_383_360 * 2  # 4 x 4096^2 + 3 x 4096 x 11008 weights and two norms, 2 bytes each
    needed = block * (1 + PREFETCH["block"])
    assert choose_unit(blocks, "auto", needed, torch.bfloat16) == "block"
    assert choose_unit(blocks, "auto", needed - 1, torch.bfloat16) == "projection"
    assert choose_unit(blocks, "auto", 1, torch.bfloat16) == "projection", "nothing fits: the smallest unit there is"
    # fp32 gathering (no mixed-precision policy) doubles the bytes
    assert choose_unit(blocks, "auto", needed, None) == "projection"


def test_explicit_units_are_kept_and_unknown_ones_refused():
    blocks = llama_blocks(**LLAMA_65B)
    assert choose_unit(blocks, "block", 1) == "block"
    with pytest.raises(ValueError, match="unit must be one of block, projection, auto"):
        LomoFSDPStrategy(unit="layer")


def test_projection_units_are_every_weight_matrix_of_every_block_in_forward_order():
    blocks = llama_blocks(**LLAMA_7B)
    names = {module: name for block in blocks for name, module in block.named_modules()}
    units = units_of(blocks, "projection")
    expected = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [names[m].split(".")[-1] for m in units] == expected * 2


@contextlib.contextmanager
def fake_mesh(world: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("budget_blocks, expected", [(2, "block"), (1, "projection")])
def test_shard_transformers_shards_the_chosen_units_with_backward_prefetching(budget_blocks, expected):
    from torch.distributed.fsdp import FSDPModule

    model = tiny_llama()
    blocks = list(model.model.layers)
    budget = budget_blocks * gathered_bytes(blocks[0])
    with fake_mesh(2) as mesh:
        shard_transformers(model, mesh, unit="auto", max_gathered_bytes=budget)
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        units = units_of(blocks, expected)
        assert sharded == [model] + units, "the root and each unit, nothing else"
        ahead = PREFETCH[expected]
        last = units[-1]._get_fsdp_state()  # type: ignore[attr-defined]
        assert last._states_to_backward_prefetch == [u._get_fsdp_state() for u in units[-1 - ahead : -1][::-1]]
        assert last._states_to_forward_prefetch == [], "forward prefetching would fire in checkpoint recomputation"
