"""LightningModule side of fused training: a manual-optimization mixin."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lomo_lightning.strategies import fused_updater_of


class FusedOptimizationMixin:
    """Manual optimization with the update fused into backward.

    Mix into a ``LightningModule`` ahead of it and write ``compute_loss(batch)``; the default
    ``training_step`` runs the fused backward, steps the LR schedulers that are configured per step
    (per-epoch ones at the end of each epoch), and logs ``train/loss``, ``train/lr`` and
    ``train/skipped_steps``. Use it with ``Trainer(strategy="lomo")`` (or ``"lomo_ddp"``, ``"lomo_fsdp"``)::

        class MyModule(FusedOptimizationMixin, LightningModule):
            def compute_loss(self, batch):
                return self.model(**batch).loss

            def configure_optimizers(self):
                return AdaLomo(self.parameters(), lr=1e-3)
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not callable(getattr(self, "compute_loss", None)):
            raise TypeError(f"{type(self).__name__} must define compute_loss(batch) -> loss tensor.")
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        updater = fused_updater_of(self)  # type: ignore[arg-type]
        loss = self.compute_loss(batch)
        optimizer = self.optimizers()  # type: ignore[attr-defined]
        self.manual_backward(loss)  # type: ignore[attr-defined]
        optimizer.step()  # no arithmetic: counts the step for Lightning's loops and callbacks
        self._step_schedulers("step")
        batch_size = _batch_size(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)  # type: ignore[attr-defined]
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)  # type: ignore[attr-defined]
        self.log("train/skipped_steps", float(updater.skipped_steps), batch_size=batch_size)  # type: ignore[attr-defined]
        return loss

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
            if count % config.frequency == 0:
                config.scheduler.step()


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                return value.shape[0]
    return None
