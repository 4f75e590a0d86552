"""Callbacks and a CheckpointIO that tests plug into lomo-train runs: to interrupt them, or to look inside.

Importable from a ``lomo-train`` subprocess whose ``PYTHONPATH`` holds this directory, e.g.
``+callbacks.interrupt._target_=app_plugins.SignalAtStep``.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import torch

from lomo_lightning.checkpointing import AtomicCheckpointIO


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to this process once training has finished ``step`` (on process ``rank`` only)."""

    def __init__(self, step: int, signum: int = signal.SIGINT, rank: int = 0) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class FailAtStep(pl.Callback):
    """Raises ``RuntimeError`` once training has finished ``step``: a crash in the middle of a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


class BlockingCheckpointIO(AtomicCheckpointIO):
    """Writes checkpoints as ``AtomicCheckpointIO`` does, but the ``block_at``-th one only half, then waits forever.

    Before it waits it creates ``ready_file``, so a test knows when to kill the process in mid-write.
    """

    def __init__(self, block_at: int, ready_file: str) -> None:
        super().__init__()
        self.block_at, self.ready_file = block_at, ready_file
        self.writes = 0

    def write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        self.writes += 1
        if self.writes < self.block_at:
            super().write(checkpoint, file)
            return
        whole = io.BytesIO()
        torch.save(checkpoint, whole)
        file.write(whole.getvalue()[: whole.tell() // 2])
        file.flush()
        Path(self.ready_file).touch()
        time.sleep(3600)


class RecordModesAtFirstStep(pl.Callback):
    """Records the modules in eval mode, and whether gradient checkpointing is on, at the first training step."""

    def __init__(self) -> None:
        self.in_eval_mode: list[str] | None = None
        self.checkpointing: bool | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.in_eval_mode is None:
            self.in_eval_mode = [name for name, module in pl_module.named_modules() if not module.training]
            self.checkpointing = pl_module.model.is_gradient_checkpointing
