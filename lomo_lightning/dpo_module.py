"""LightningModules for preference tuning: DPO / IPO with reference log-probabilities computed once, before training."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lomo_lightning.data.preferences import PreferencePairs
from lomo_lightning.module import CausalLMModule, FusedOptimizationMixin
from lomo_lightning.objectives.causal_lm import ChunkTokens
from lomo_lightning.objectives.dpo import REWARD_METRICS, DPOObjective, reward_metrics
from lomo_lightning.objectives.reference import add_reference_log_probs, reference_log_probs


class DPOModule(CausalLMModule):
    """Direct preference optimization of a causal LM (DPO or IPO), with ordinary (automatic) optimization.

    No reference model stays in memory: in ``setup``, before the model is wrapped or sharded and before
    any update, the model as it is runs once over the data module's pairs
    (:func:`~lomo_lightning.objectives.reference.reference_log_probs`: cached on disk under the data's
    ``cache_dir``, shared by every rank), and each pair carries its reference log-probabilities from then
    on. The pass runs on the strategy's device under the trainer's precision. Train with a preference
    data module (:class:`~lomo_lightning.data.PyPreferenceDataModule`,
    :class:`~lomo_lightning.data.JsonPreferenceDataModule`), or with batches that already carry
    ``reference_logps``.

    Logs ``train/loss`` and TRL's reward metrics ``train/rewards/chosen``, ``.../rejected``,
    ``.../accuracies``, ``.../margins`` every step; validation logs ``val/loss`` and ``val/rewards/...``,
    means over every pair of the validation set.

    Args:
        beta, loss_type, label_smoothing: the objective (:class:`~lomo_lightning.objectives.DPOObjective`).
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
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        activation_offloading: bool | str = "auto",
    ) -> None:
        super().__init__(model, optimizer, scheduler, trainable, loss_chunk_tokens, activation_offloading)
        self.objective = DPOObjective(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        self.val_rewards = nn.ModuleDict({name: MeanMetric() for name in REWARD_METRICS})

    def setup(self, stage: str) -> None:
        """Attach the reference log-probabilities to the pairs this stage uses (computed once, then cached)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return  # the batches must carry reference_logps: the objective says so clearly if they do not
        if not isinstance(datamodule, PreferencePairs):
            raise TypeError(
                f"{type(self).__name__} trains on preference pairs, but the data module is {type(datamodule).__name__}: "
                "use PyPreferenceDataModule or JsonPreferenceDataModule (data=py_preference, data=preference_jsonl)"
            )
        splits = {"fit": ("train_dataset", "val_dataset"), "validate": ("val_dataset",)}.get(stage, ())
        if not splits:
            return
        precision = self.trainer.strategy.precision_plugin
        model = precision.convert_module(self.model).to(self.trainer.strategy.root_device)
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
                )
                setattr(datamodule, split, add_reference_log_probs(dataset, values))

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The mean loss over the batch's pairs; logs the training reward metrics of the batch."""
        pairs = self.objective(self.model, batch, self.loss_chunk_tokens)
        rewards = {f"train/rewards/{name}": values.mean() for name, values in reward_metrics(pairs).items()}
        self.log_dict(rewards, batch_size=len(pairs.losses))
        return pairs.losses.mean()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        pairs = self.objective(self.model, batch, self.loss_chunk_tokens)
        self.val_loss.update(pairs.losses)
        for name, values in reward_metrics(pairs).items():
            cast(MeanMetric, self.val_rewards[name]).update(values)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        for metric in self.val_rewards.values():
            cast(MeanMetric, metric).reset()

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log_dict({f"val/rewards/{name}": cast(MeanMetric, metric).compute() for name, metric in self.val_rewards.items()})


class FusedDPOModule(FusedOptimizationMixin, DPOModule):
    """:class:`DPOModule` with the update fused into backward (LOMO, AdaLomo): train it with ``strategy="lomo"``
    (or ``"lomo_ddp"``, ``"lomo_fsdp"``)."""


__all__ = ["DPOModule", "FusedDPOModule"]
