"""Lightning callbacks that drive the selections during training, measure speed and memory, and validate at the end."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lomo_lightning.selection.hft import HalfFineTuning
from lomo_lightning.selection.sft import SparseFineTuning


class HFTResampleCallback(Callback):
    """Draw a new Half Fine-Tuning mask at each ``fit`` (continual learning) and/or every N optimizer steps.

    The first ``fit`` keeps the mask already applied (or applies one if none was); every later ``fit``
    resamples when ``every_stage`` is set. Build the optimizer over all parameters of the model: frozen
    ones get no gradient and hence no state, and newly trainable ones are already in it. The state of
    newly frozen parameters is dropped, so a frozen parameter never holds optimizer state.

    ``every_n_steps`` changes the trainable set mid-training, which the fused engine must follow: this
    callback calls ``trainer.strategy.fused_updater.refresh()`` (re-registers the gradient hooks for the
    current trainable set) when the strategy has one. A strategy that installs hooks without exposing
    ``fused_updater`` would keep updating the old set, so it does not support ``every_n_steps``.

    Checkpoints hold this callback's state: the mask in force, the seed counter, the number of fits
    started and the step of the last resample. A fit resumed from a checkpoint continues the saved
    stage: it applies the saved mask as it was (whatever mask the new model was given) and does not
    draw a new one at its start, so it trains the same tensors and resamples at the same steps as an
    uninterrupted run. Lightning restores callbacks before ``on_fit_start`` on one device and after it
    for strategies that restore after setup (FSDP); both orders are handled.
    """

    def __init__(self, hft: HalfFineTuning, every_n_steps: int | None = None, every_stage: bool = True) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.hft = hft
        self.every_n_steps = every_n_steps
        self.every_stage = every_stage
        self._fits_started = 0
        self._last_resampled_step = -1
        # Set between setup() and teardown(), so that load_state_dict can reach the model and the engine.
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None
        self._in_fit = False  # on_fit_start has run in the current fit
        self._resumed = False  # state was loaded for a fit that has not started yet

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer, self._module, self._in_fit = trainer, pl_module, False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer, self._module, self._in_fit = None, None, False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit = True
        resumed, self._resumed = self._resumed, False
        if resumed and self.hft.mask is not None:
            # The checkpoint's fit continues: its mask (applied by load_state_dict), no new draw, no new stage.
            self.hft.apply_mask(pl_module)
        elif self.hft.mask is None:
            self._fits_started += 1
            self.hft.apply(pl_module)
        elif self.every_stage and self._fits_started > 0:
            self._fits_started += 1
            self._resample(trainer, pl_module)
        else:
            self._fits_started += 1
            return
        _refresh_fused_hooks(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on the same optimizer step: resample once.
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_resampled_step:
            return
        self._last_resampled_step = step
        self._resample(trainer, pl_module)
        _refresh_fused_hooks(trainer)

    def _resample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.hft.resample(pl_module, optimizer=optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "hft": self.hft.state_dict(),
            "fits_started": self._fits_started,
            "last_resampled_step": self._last_resampled_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the mask schedule and apply the saved mask to the model of the current fit.

        The optimizer state is not touched: Lightning restores it from the same checkpoint, in which
        the frozen parameters hold none.
        """
        missing = {"hft", "fits_started", "last_resampled_step"} - set(state_dict)
        if missing:
            raise KeyError(f"HFTResampleCallback.load_state_dict: the checkpoint's state lacks {sorted(missing)}")
        self.hft.load_state_dict(state_dict["hft"], model=self._module)
        self._fits_started = int(state_dict["fits_started"])
        self._last_resampled_step = int(state_dict["last_resampled_step"])
        if self._in_fit:
            # Restored after on_fit_start (strategies that restore after setup): the engine is installed
            # already, with the hooks of whatever mask the fit started with.
            if self._trainer is not None:
                _refresh_fused_hooks(self._trainer)
        elif self._trainer is None or self._trainer.state.fn == TrainerFn.FITTING:
            self._resumed = True


class SFTReselectionCallback(Callback):
    """Run :meth:`SparseFineTuning.step` after every optimizer step, with the trainer's first optimizer.

    Sets ``sft.config.total_steps`` from ``trainer.estimated_stepping_batches`` when it was not given, so
    that the schedule ends with training, and tells it the trainer's gradient accumulation. Logs
    ``sft/replaced``, the entries a reselection replaced. The values and indices are parameters and
    buffers of the model, so checkpoints hold them; this callback's state adds the step count and an
    open accumulated-gradient window, so that a run resumed mid-window continues exactly.
    """

    def __init__(self, sft: SparseFineTuning) -> None:
        self.sft = sft
        self._last_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sft.config.total_steps is None:
            self.sft.config.total_steps = int(trainer.estimated_stepping_batches)
        self.sft.accumulation_steps = trainer.accumulate_grad_batches
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        # With gradient accumulation, count optimizer steps, not batches.
        while self._last_step < trainer.global_step:
            self._last_step += 1
            replaced = self.sft.step(trainer.optimizers[0])
            if replaced:
                pl_module.log("sft/replaced", float(replaced), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return self.sft.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sft.load_state_dict(state_dict)


def _refresh_fused_hooks(trainer: pl.Trainer) -> None:
    fused_updater = getattr(trainer.strategy, "fused_updater", None)
    if fused_updater is not None:
        fused_updater.refresh()


class ValidateAtEnd(Callback):
    """Validate right after the last training step, whatever ``max_steps`` and ``val_check_interval`` are.

    Lightning validates every ``val_check_interval`` batches, so a run whose length is not a multiple of
    it would end with the metrics of an earlier step. On the last step this sets ``trainer.should_stop``,
    on which Lightning validates at once (as it does for early stopping): the final metrics, the
    checkpoint of the best ``val/loss`` and the logs all include the final step.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        last_step = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        last_epoch = (
            trainer.max_epochs not in (None, -1)
            and trainer.current_epoch + 1 >= trainer.max_epochs
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        if last_step or last_epoch:
            trainer.should_stop = True


class MemoryMonitor(Callback):
    """Log training speed and peak memory: ``perf/tokens_per_s`` and ``perf/peak_memory_gb``.

    Throughput is measured over the batches since the last logging step (``Trainer(log_every_n_steps)``),
    counting attended tokens (``attention_mask``, else ``input_ids``) and multiplying by the number of
    processes. Peak memory is what the accelerator's allocator handed out on a CUDA device (the number
    LOMO shrinks: parameters, gradients, optimizer state, activations), or the process's peak resident
    set size on CPU.
    """

    def __init__(self) -> None:
        self._tokens = 0
        self._since = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._tokens, self._since = 0, time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mask = batch.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        if trainer.global_step % trainer.log_every_n_steps:  # type: ignore[attr-defined]  # set by its logger connector
            return
        now = time.perf_counter()
        tokens_per_s = self._tokens * trainer.world_size / max(now - self._since, 1e-9)
        pl_module.log_dict({"perf/tokens_per_s": tokens_per_s, "perf/peak_memory_gb": peak_memory_gb(pl_module.device)})
        self._tokens, self._since = 0, now


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated memory on a CUDA ``device``, else the peak resident set size of this process, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return max_rss / (1e9 if sys.platform == "darwin" else 1e6)


__all__ = ["HFTResampleCallback", "MemoryMonitor", "SFTReselectionCallback", "ValidateAtEnd", "peak_memory_gb"]
