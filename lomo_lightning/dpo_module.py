"""LightningModules for preference tuning: TRL's DPO loss types, with reference log-probabilities computed once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, PreTrainedModel

from lomo_lightning.data.preferences import PreferencePairs
from lomo_lightning.module import CausalLMModule, FusedOptimizationMixin
from lomo_lightning.objectives.causal_lm import ChunkTokens
from lomo_lightning.objectives.dpo import METRICS, DPOObjective, pair_metrics
from lomo_lightning.objectives.reference import add_reference_log_probs, reference_log_probs, weights_digest

# The checkpoint entry that names the reference: the weights digest of the model at the start of training
REFERENCE_CHECKPOINT_KEY = "dpo_reference_weights"
# The data module's splits each stage evaluates
STAGE_SPLITS = {"fit": ("train_dataset", "val_dataset"), "validate": ("val_dataset",)}


class DPOModule(CausalLMModule):
    """Preference tuning of a causal LM with TRL's DPO loss types, with ordinary (automatic) optimization.

    No reference model stays in memory: in ``setup``, before the model is wrapped or sharded and before
    any update, the reference runs once over the data module's pairs
    (:func:`~lomo_lightning.objectives.reference.reference_log_probs`: cached on disk under the data's
    ``cache_dir``, shared by every rank), and each pair carries its reference log-probabilities from then
    on. The reference is, as in TRL, one of:

    - the model at the start of training (the default). Its identity, the digest of its weights
      (:attr:`reference_weights`), stays with the module and its checkpoints, so every later ``validate``,
      ``test`` or resumed ``fit`` reuses the values of that model, never the trained weights'; when they are
      no longer in the cache and the weights have changed, the stage is refused;
    - ``reference_model``: a checkpoint (a Hugging Face model directory or name), loaded for the pass only;
    - ``reference_free``: no reference (its log-probabilities are 0).

    The pass runs on the strategy's device under the trainer's precision. Train with a preference data
    module (:class:`~lomo_lightning.data.PyPreferenceDataModule`, :class:`~lomo_lightning.data.JsonPreferenceDataModule`,
    :class:`~lomo_lightning.data.HFPreferenceDataModule`), or with batches that already carry ``reference_logps``.

    Logs ``train/loss`` and TRL's metrics under Lightning's stage prefixes: ``train/rewards/chosen``,
    ``.../rejected``, ``.../accuracies``, ``.../margins``, ``train/logps/{chosen,rejected}``,
    ``train/logits/{chosen,rejected}`` every step, averaged over the pairs (the tokens, for ``logits``) of
    every rank; validation logs ``val/loss`` and ``val/...`` the same, over the whole validation set.

    Args:
        beta, loss_type, loss_weights, label_smoothing, rpo_alpha, reference_free: the objective
            (:class:`~lomo_lightning.objectives.DPOObjective`).
        reference_model: a checkpoint to take the reference log-probabilities from, instead of the model
            at the start of training.
        disable_dropout: set every dropout of the model to 0 (TRL's default), so that the policy's
            log-probabilities are those of the function the reference pass evaluated.
        Other arguments as in :class:`~lomo_lightning.module.CausalLMModule` (``loss_chunk_tokens``
        chunks the log-probabilities of both passes, the reference's and training's).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optimizer: Callable[[Iterable[Tensor]], Optimizer],
        scheduler: Callable[..., Any] | None = None,
        trainable: list[Tensor] | None = None,
        loss_chunk_tokens: ChunkTokens = "auto",
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        reference_free: bool = False,
        reference_model: str | None = None,
        disable_dropout: bool = True,
        activation_offloading: bool | str = "auto",
    ) -> None:
        super().__init__(model, optimizer, scheduler, trainable, loss_chunk_tokens, activation_offloading)
        self.objective = DPOObjective(
            beta=beta,
            loss_type=loss_type,
            loss_weights=loss_weights,
            label_smoothing=label_smoothing,
            rpo_alpha=rpo_alpha,
            reference_free=reference_free,
        )
        if reference_free and reference_model is not None:
            raise ValueError("reference_free and reference_model exclude each other: choose one")
        self.reference_model = reference_model
        # the weights digest of the model at the start of training, once known (None with another reference)
        self.reference_weights: str | None = None
        self._referenced_splits: tuple[str, ...] = ()
        if disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        self.val_metrics = nn.ModuleDict({_metric_key(name): MeanMetric() for name in METRICS})

    def setup(self, stage: str) -> None:
        """Attach the reference log-probabilities to the pairs this stage uses (computed once, then cached)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or self.objective.reference_free:
            return  # without a data module the batches must carry reference_logps: the objective says so if not
        if not isinstance(datamodule, PreferencePairs):
            raise TypeError(
                f"{type(self).__name__} trains on preference pairs, but the data module is {type(datamodule).__name__}: "
                "use PyPreferenceDataModule, JsonPreferenceDataModule or HFPreferenceDataModule "
                "(data=py_preference, data=preference_jsonl, data=hf_preference)"
            )
        if self.reference_model is None and self.reference_weights is None:
            self.reference_weights = weights_digest(self.model)  # the model as it is now starts the training
        self._attach_reference(datamodule, STAGE_SPLITS.get(stage, ()))

    def _attach_reference(self, datamodule: PreferencePairs, splits: tuple[str, ...]) -> None:
        if not splits:
            return
        strategy = self.trainer.strategy
        precision = strategy.precision_plugin
        reference: nn.Module = self.model
        if self.reference_model is not None:
            reference = AutoModelForCausalLM.from_pretrained(self.reference_model, dtype=self.model.dtype)
        model = precision.convert_module(reference).to(strategy.root_device)
        with precision.forward_context():
            for split in splits:
                dataset = getattr(datamodule, split)
                values = reference_log_probs(
                    model,
                    dataset,
                    datamodule.collator(),
                    batch_size=datamodule.batch_size,
                    cache_dir=datamodule.cache_dir,
                    chunk_tokens=self.loss_chunk_tokens,
                    reference_weights=self.reference_weights,
                )
                setattr(datamodule, split, add_reference_log_probs(dataset, values))
        self._referenced_splits = splits

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[REFERENCE_CHECKPOINT_KEY] = self.reference_weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's reference (the model its training started from) for the values of every split."""
        weights = checkpoint.get(REFERENCE_CHECKPOINT_KEY)
        if weights is None or weights == self.reference_weights or self.reference_model is not None:
            return
        self.reference_weights = weights
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(datamodule, PreferencePairs) and not self.objective.reference_free:
            self._attach_reference(datamodule, self._referenced_splits)  # setup attached another model's values

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The mean loss over the batch's pairs; logs TRL's metrics of the batch, over every rank."""
        pairs = self.objective(self.model, batch, self.loss_chunk_tokens)
        metrics = pair_metrics(pairs)
        totals = torch.stack([torch.stack([(v * w).sum(), w.sum()]) for v, w in metrics.values()])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")  # one all-reduce: sums over every rank's pairs
        means = totals[:, 0] / totals[:, 1].clamp(min=1)
        self.log_dict({f"train/{name}": mean for name, mean in zip(metrics, means)}, batch_size=len(pairs.losses))
        return pairs.losses.mean()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        pairs = self.objective(self.model, batch, self.loss_chunk_tokens)
        self.val_loss.update(pairs.losses)
        for name, (values, weights) in pair_metrics(pairs).items():
            cast(MeanMetric, self.val_metrics[_metric_key(name)]).update(values, weights)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        for metric in self.val_metrics.values():
            cast(MeanMetric, metric).reset()

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)  # MeanMetric.compute synchronises the ranks
        self.log_dict({f"val/{name}": cast(MeanMetric, self.val_metrics[_metric_key(name)]).compute() for name in METRICS})


def _metric_key(name: str) -> str:
    return name.replace("/", "_")  # a module name


class FusedDPOModule(FusedOptimizationMixin, DPOModule):
    """:class:`DPOModule` with the update fused into backward (LOMO, AdaLomo): train it with ``strategy="lomo"``
    (or ``"lomo_ddp"``, ``"lomo_fsdp"``)."""


__all__ = ["DPOModule", "FusedDPOModule", "REFERENCE_CHECKPOINT_KEY"]
