"""Objectives, what the loss is: the causal-LM loss (chunked or not), and TRL's preference losses against cached reference log-probabilities."""

from lomo_lightning.objectives.causal_lm import (
    IGNORE_INDEX,
    check_chunked_loss,
    chunked_causal_lm_loss,
    sequence_log_probs,
    token_log_probs,
)
from lomo_lightning.objectives.dpo import LOSS_TYPES, METRICS, REFERENCE_KEY, DPOObjective, PairLosses, pair_metrics
from lomo_lightning.objectives.reference import add_reference_log_probs, reference_log_probs

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "METRICS",
    "REFERENCE_KEY",
    "DPOObjective",
    "PairLosses",
    "add_reference_log_probs",
    "check_chunked_loss",
    "chunked_causal_lm_loss",
    "reference_log_probs",
    "pair_metrics",
    "sequence_log_probs",
    "token_log_probs",
]
