"""How much memory the device has, for the options that default to ``auto`` (FSDP2 unit, loss chunking).

The answer can be pinned with :func:`assumed_device_memory`: to see what ``auto`` would choose on another
card, or to estimate a GPU's choices on a CPU (``benchmarks/memory_scale.py`` does, under fake tensors).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

_assumed: list[int] = []


def device_memory_bytes(device: torch.device | str) -> int:
    """Total memory of ``device``: an accelerator's own, the host's physical memory for the CPU, or the assumed."""
    if _assumed:
        return _assumed[-1]
    device = torch.device(device)
    if device.type not in ("cpu", "meta"):
        module: Any = torch.get_device_module(device.type)
        if hasattr(module, "get_device_properties"):
            return int(module.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@contextlib.contextmanager
def assumed_device_memory(total_bytes: int) -> Iterator[None]:
    """Within the block, every device has ``total_bytes`` of memory as far as the ``auto`` options are concerned."""
    _assumed.append(total_bytes)
    try:
        yield
    finally:
        _assumed.pop()


__all__ = ["assumed_device_memory", "device_memory_bytes"]
