"""strategy="lomo": fused updates on one device."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lomo_lightning.strategies.base import FusedStrategy


class LomoStrategy(FusedStrategy, SingleDeviceStrategy):
    """Fused updates on one device (``Trainer(strategy="lomo")``).

    Clipping is set here, or, under automatic optimization only, with ``Trainer(gradient_clip_val=...,
    gradient_clip_algorithm=...)`` (Lightning refuses Trainer clipping under manual optimization, so a
    :class:`~lomo_lightning.FusedOptimizationMixin` module sets it here).

    Args:
        device: the device; by default the one the Trainer's accelerator chose.
        clip_grad_norm: global-norm clipping (two backward passes).
        clip_grad_value: value clipping.
    """

    strategy_name = "lomo"
    description = "Fused (LOMO-style) updates on one device"

    def __init__(
        self,
        device: str | torch.device | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(device=device or "cpu", clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, **kwargs)
        # Lightning's accelerator connector fills this in when the strategy is chosen by name
        self.parallel_devices = [self._root_device] if device is not None else None

    @property
    @override
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            if len(self.parallel_devices) > 1:
                raise ValueError(
                    f"strategy='lomo' runs on one device, but {len(self.parallel_devices)} were requested: "
                    "use strategy='lomo_ddp' or 'lomo_fsdp' for several devices, or set devices=1."
                )
            return torch.device(self.parallel_devices[0])
        return self._root_device
