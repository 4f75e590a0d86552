"""``torch.compile`` once per process, with the options every kernel of the rules needs.

Beneath both the write-back (:mod:`lomo_lightning.optim.rounding`) and the rules' kernels
(:mod:`lomo_lightning.optim.kernels`), which compile through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_F = TypeVar("_F", bound=Callable[..., Any])


@functools.cache
def compiled(function: _F) -> _F:
    """``function`` compiled once per process, with dynamic shapes, as one graph.

    ``emulate_precision_casts``: inductor otherwise keeps a value cast to bf16/fp16 in fp32 when it is
    used again in the same kernel, and Kahan summation's ``(work + c) - bf16(work + c)`` would be 0.
    """
    options: dict[str, str | int | bool | Callable[..., Any]] = {"emulate_precision_casts": True}
    return torch.compile(function, dynamic=True, fullgraph=True, options=options)  # type: ignore[return-value]


__all__ = ["compiled"]
