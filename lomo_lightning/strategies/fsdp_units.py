"""What one FSDP2 unit gathers: a transformer block, or each projection of a block, chosen for memory.

A unit's parameters are all-gathered whole for its forward (and again for its backward), so the largest
unit sets the transient memory on top of the shards: with prefetching, the unit at work and the next one
being gathered, each with its unsharded gradient in backward. A block of LLaMA-65B is 0.81e9 parameters
(1.5 GiB in 16 bits): on eight 24 GiB cards that alone keeps a 65B model from fitting, while a unit per
projection (the largest is 0.18e9 parameters) fits, as DeepSpeed ZeRO-3's ``stage3_max_live_parameters``
(1e8 in LOMO's runs) gathers a few projections at a time. Smaller units pay with more, smaller collectives,
whose latency the prefetching hides.

``unit="auto"`` takes the largest unit whose gathered parameters fit a budget: ``max_gathered_bytes``,
or :data:`GATHERED_FRACTION` of the device's memory, for the unit at work plus the prefetched ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from lomo_lightning.device_memory import device_memory_bytes

Unit = Literal["block", "projection", "auto"]
UNITS: tuple[str, ...] = ("block", "projection", "auto")

# The share of the device's memory the gathered units may take: 1.9 GiB of a 24 GiB card, which takes a
# block of LLaMA-13B (0.6 GiB in 16 bits, with one prefetched: 1.2) and a unit per projection for 30B and 65B.
GATHERED_FRACTION = 0.08
# Units gathered ahead of the one at work in backward. One hides a block's all-gather behind the block after it;
# projections are smaller and unequal (q, k and v are a third of down_proj each in LLaMA), so two ahead keep the
# next large one in flight while the small ones compute.
PREFETCH = {"block": 1, "projection": 2}


def projections(block: nn.Module) -> list[nn.Module]:
    """The modules of ``block`` that own a weight matrix themselves (``nn.Linear``, a sparse-delta linear, ...)."""
    return [
        m for m in block.modules()
        if any(p.dim() >= 2 for p in m.parameters(recurse=False))
    ]


def units_of(blocks: Iterable[nn.Module], unit: str) -> list[nn.Module]:
    """The modules to ``fully_shard`` one by one, in the order the forward runs them (that of registration)."""
    if unit == "block":
        return list(blocks)
    if unit == "projection":
        return [m for block in blocks for m in projections(block)]
    raise ValueError(f"unit must be 'block' or 'projection' here, got {unit!r}")


def gathered_bytes(module: nn.Module, param_dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters once all-gathered, in ``param_dtype`` (the mixed-precision policy's) if set."""
    return sum(p.numel() * (param_dtype or p.dtype).itemsize for p in module.parameters())


def gathered_budget(device: torch.device, max_gathered_bytes: int | None = None) -> int:
    """``max_gathered_bytes``, or :data:`GATHERED_FRACTION` of ``device``'s memory."""
    if max_gathered_bytes is not None:
        if max_gathered_bytes <= 0:
            raise ValueError(f"max_gathered_bytes must be positive, got {max_gathered_bytes}")
        return max_gathered_bytes
    return int(GATHERED_FRACTION * device_memory_bytes(device))


def choose_unit(
    blocks: list[nn.Module],
    unit: str,
    budget: int,
    param_dtype: torch.dtype | None = None,
) -> str:
    """``unit`` itself, or for ``"auto"`` the largest unit (block, then projection) whose gathered parameters fit.

    What a unit gathers at once is the unit at work and the :data:`PREFETCH` units ahead of it; the largest unit
    of each kind counts. When not even a projection fits, the projection is still the smallest unit there is.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if unit != "auto":
        return unit
    for candidate in ("block", "projection"):
        largest = max((gathered_bytes(m, param_dtype) for m in units_of(blocks, candidate)), default=0)
        if largest * (1 + PREFETCH[candidate]) <= budget:
            return candidate
    return "projection"


def set_prefetching(units: list[nn.Module], unit: str) -> None:
    """In backward, gather the :data:`PREFETCH` units before each one while it computes (in reverse order).

    Forward needs no list: each unit's all-gather is issued as the forward reaches it, ahead of the compute
    on an accelerator. An explicit forward list would also fire in the recomputation of activation
    checkpointing, during backward, and gather units that backward has already passed and no one frees: with
    projection units on LLaMA-65B one unit stayed gathered per block (0.125 GiB a block, measured with fake tensors).
    """
    ahead = PREFETCH[unit]
    for index, module in enumerate(units):
        module.set_modules_to_backward_prefetch(units[max(0, index - ahead) : index][::-1])  # type: ignore[operator]


__all__ = [
    "GATHERED_FRACTION",
    "PREFETCH",
    "UNITS",
    "Unit",
    "choose_unit",
    "gathered_budget",
    "gathered_bytes",
    "projections",
    "set_prefetching",
    "units_of",
]
