"""LightningModule side of fused training: a manual-optimization mixin, and a causal-LM module built on it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from lightning.pytorch import LightningModule
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.types import OptimizerConfig, OptimizerLRSchedulerConfig
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lomo_lightning.activations import saved_activations
from lomo_lightning.labels import IGNORE_INDEX
from lomo_lightning.objectives.causal_lm import ChunkTokens, auto_chunk_tokens, check_chunked_loss, chunked_causal_lm_loss
from lomo_lightning.strategies import fused_updater_of

# The mixin goes before LightningModule in a class's bases: to the type checker it is one
if TYPE_CHECKING:
    _MixinBase = LightningModule
else:
    _MixinBase = object


class FusedOptimizationMixin(_MixinBase):
    """Manual optimization with the update fused into backward.

    Mix into a ``LightningModule`` ahead of it and write ``compute_loss(batch)``; the default
    ``training_step`` runs the fused backward, steps the LR schedulers that are configured per step
    (per-epoch ones at the end of each epoch), and logs ``train/loss``, ``train/lr`` and
    ``train/skipped_steps``; a ``ReduceLROnPlateau`` steps on the metric ``plateau_monitor`` names (Lightning
    drops a scheduler's ``monitor`` under manual optimization). Use it with ``Trainer(strategy="lomo")`` (or
    ``"lomo_ddp"``, ``"lomo_fsdp"``)::

        class MyModule(FusedOptimizationMixin, LightningModule):
            def compute_loss(self, batch):
                return self.model(**batch).loss

            def configure_optimizers(self):
                return AdaLomo(self.parameters(), lr=1e-3)
    """

    compute_loss: Callable[[Any], Tensor]  # the subclass's: checked in __init__
    plateau_monitor: str | None = None  # the logged metric a ReduceLROnPlateau scheduler steps on, e.g. "val/loss"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not callable(getattr(self, "compute_loss", None)):
            raise TypeError(f"{type(self).__name__} must define compute_loss(batch) -> loss tensor.")
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        updater = fused_updater_of(self)
        with getattr(self, "saved_activations", contextlib.nullcontext)():  # CausalLMModule's activation offloading
            loss = self.compute_loss(batch)
        optimizer = cast(LightningOptimizer, self.optimizers())  # a fused strategy allows exactly one
        self.manual_backward(loss)
        optimizer.step()  # no arithmetic: counts the step for Lightning's loops and callbacks
        self._step_schedulers("step")
        batch_size = _batch_size(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)
        self.log("train/skipped_steps", float(updater.skipped_steps), batch_size=batch_size)
        return loss

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        """Step the schedulers of ``interval`` as Lightning's automatic loop does (ReduceLROnPlateau on its metric)."""
        trainer = self.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
            if count % config.frequency != 0:
                continue
            if isinstance(config.scheduler, ReduceLROnPlateau):
                # Lightning drops the scheduler's "monitor" under manual optimization: the module names it
                monitor = config.monitor or self.plateau_monitor
                value = trainer.callback_metrics.get(monitor) if monitor else None
                if value is None:
                    raise ValueError(
                        f"ReduceLROnPlateau steps on a logged metric: set plateau_monitor on {type(self).__name__} to one "
                        f"of {', '.join(sorted(trainer.callback_metrics)) or 'the metrics it logs'} (it is {monitor!r})."
                    )
                config.scheduler.step(float(value))
            else:
                config.scheduler.step()


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                return value.shape[0]
    return None


class CausalLMModule(LightningModule):
    """A Hugging Face causal LM with ordinary (automatic) optimization: the standard, unfused baseline.

    Validation logs ``val/loss``, the mean loss per predicted token over the whole validation set (every
    batch weighted by its number of labelled tokens), and ``val/ppl = exp(val/loss)``. Selections work
    unchanged: frozen tensors get no gradient and no optimizer state (SFT's values are parameters of the model).

    Args:
        model: a causal LM computing ``model(**batch).loss``.
        optimizer: ``optimizer(params) -> Optimizer``, e.g. ``functools.partial(torch.optim.AdamW, lr=1e-4)``.
        scheduler: ``scheduler(optimizer=..., num_training_steps=...)`` stepped after every optimizer step, or ``None``.
        trainable: the tensors to optimize; by default all the model's parameters
            (frozen ones included, so that a selection may unfreeze them later).
        loss_chunk_tokens: compute the LM head and the loss this many tokens at a time
            (:func:`~lomo_lightning.objectives.causal_lm.chunked_causal_lm_loss`), so that the full fp32 logits never
            exist; ``None`` calls ``model(**batch).loss``; ``"auto"`` (default) chunks a batch whose logits would
            take more than 2% of the device's memory (:func:`~lomo_lightning.objectives.causal_lm.auto_chunk_tokens`),
            and calls ``model(**batch).loss`` otherwise.
        activation_offloading: keep what the training forward saves for backward in host memory
            (:class:`~lomo_lightning.activations.ActivationOffloading`); ``"auto"`` (default): on an accelerator with
            activation checkpointing on, off on a CPU.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optimizer: Callable[[Iterable[Tensor]], Optimizer],
        scheduler: Callable[..., Any] | None = None,
        trainable: list[Tensor] | None = None,
        loss_chunk_tokens: ChunkTokens = "auto",
        activation_offloading: bool | str = "auto",
    ) -> None:
        super().__init__()
        if activation_offloading not in (True, False, "auto"):
            raise ValueError(f"activation_offloading must be true, false or auto, got {activation_offloading!r}")
        if loss_chunk_tokens not in (None, "auto"):
            check_chunked_loss(model, cast(int, loss_chunk_tokens))
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.trainable = trainable
        self.loss_chunk_tokens = loss_chunk_tokens
        self.activation_offloading = activation_offloading
        self.val_loss = MeanMetric()

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        chunk_tokens = self.loss_chunk_tokens
        if chunk_tokens == "auto":
            chunk_tokens = auto_chunk_tokens(self.model, batch["input_ids"])
        if chunk_tokens is None:
            return self.model(**batch).loss
        return chunked_causal_lm_loss(self.model, chunk_tokens=chunk_tokens, **batch)

    def saved_activations(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a training forward: activation offloading where ``activation_offloading`` says so."""
        return saved_activations(self.model, self.activation_offloading)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        with self.saved_activations():
            loss = self.compute_loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        optimizer = cast(LightningOptimizer, self.optimizers())  # configure_optimizers returns one
        self.log("train/lr", optimizer.param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        predicted_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        self.val_loss.update(self.compute_loss(batch), weight=predicted_tokens)

    def on_validation_epoch_start(self) -> None:
        # Reset here, not after compute: the states must be made in the same grad mode as the updates
        # (trainer.validate runs under inference_mode, validation during fit under no_grad).
        self.val_loss.reset()

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synchronised over processes
        self.log_dict({"val/loss": loss, "val/ppl": loss.exp()}, prog_bar=True)

    def configure_optimizers(self) -> OptimizerConfig | OptimizerLRSchedulerConfig:
        parameters = self.trainable if self.trainable is not None else list(self.model.parameters())
        optimizer = self.optimizer_factory(parameters)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, num_training_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FusedCausalLMModule(FusedOptimizationMixin, CausalLMModule):
    """:class:`CausalLMModule` with the update fused into backward (LOMO, AdaLomo): train it with ``strategy="lomo"``.

    Gradients never all exist at once: each is applied by the optimizer and freed as soon as it is ready.
    """

