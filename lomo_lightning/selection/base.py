"""The contract every selection meets, and the one way selections find the modules they act on."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class Selection(Protocol):
    """Which parameters, or which entries of them, learn: what HFT and SFT (and a new selection) provide.

    - ``config``: the settings, a dataclass that checks itself (:class:`HFTConfig`, :class:`SFTConfig`);
      the selection is built from one, or from its fields as keyword arguments (Hydra's ``_target_``).
    - ``apply(model)``: decide what learns, in place, before the optimizer is built: ``requires_grad``
      (HFT), or new trainable tensors beside frozen weights (SFT). It never does the update's arithmetic:
      afterwards the optimizer, the fused engine and checkpoints see ordinary parameters.
    - ``state_dict()`` / ``load_state_dict(state)``: what a checkpoint needs besides the model's and the
      optimizer's state, so that a resumed run selects exactly what the uninterrupted one did.
    - ``describe()``: one readable summary for logs.

    What changes the selection during training is a callback beside it (:class:`~lomo_lightning.HFTResampleCallback`,
    :class:`~lomo_lightning.SFTReselectionCallback`).
    """

    config: Any

    def apply(self, model: nn.Module) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> str: ...


def modules_matching(model: nn.Module, patterns: Iterable[str], *, whole_suffix: bool = False) -> list[tuple[str, nn.Module]]:
    """The named modules of ``model`` whose name a regex of ``patterns`` matches, in ``named_modules`` order.

    By default a pattern is searched anywhere in the name (``"q_proj"``, ``r"layers\\.[0-3]\\."``). With
    ``whole_suffix`` it must match a whole dotted suffix of the name (``r"model\\.layers\\.\\d+"`` matches
    ``model.layers.3`` and ``model.model.layers.3`` inside a LightningModule, not ``model.layers.3.mlp``).
    """
    regexes = [re.compile(rf"(?:^|\.)(?:{p})$" if whole_suffix else p) for p in patterns]
    return [(name, module) for name, module in model.named_modules() if name and any(r.search(name) for r in regexes)]


__all__ = ["Selection", "modules_matching"]
