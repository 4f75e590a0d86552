"""Direct preference optimization: the DPO and IPO losses of a policy against fixed reference log-probabilities.

For a prompt ``x`` with a chosen response ``y_w`` and a rejected one ``y_l``, and ``log π(y|x)`` the sum of
the response tokens' log-probabilities, the implicit rewards are ``r = β (log π(y|x) - log π_ref(y|x))``
and ``h = (r_w - r_l) / β`` is the difference of the two log-ratios. Per pair:

- ``sigmoid`` (DPO, Rafailov et al., 2023, eq. 7; with label smoothing ``ε`` the conservative DPO of
  Mitchell, 2023): ``-(1 - ε) log σ(β h) - ε log σ(-β h)``;
- ``ipo`` (Azar et al., 2023, eq. 17, with ``τ = β``): ``(h̄ - 1 / (2β))²``, where ``h̄`` takes each
  response's log-probability averaged over its tokens (as TRL does, confirmed there with IPO's authors).

The loss is the mean over pairs. The rewards (TRL's ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins`` = ``r_w - r_l`` and ``rewards/accuracies`` = ``r_w > r_l``) come from the summed
log-ratios for both loss types, as in TRL.

Chosen and rejected responses go through the model as one batch (chosen rows first), so that one
forward and one backward serve both sides of every pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from lomo_lightning.objectives.causal_lm import IGNORE_INDEX, next_token_targets, sequence_log_probs

LOSS_TYPES = ("sigmoid", "ipo")
# The batch key of the reference's sequence log-probabilities (chosen rows, then rejected rows)
REFERENCE_KEY = "reference_logps"


class PairLosses(NamedTuple):
    """One value per pair: the loss (differentiable) and the implicit rewards of both responses (detached)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class DPOObjective:
    """The DPO (``loss_type="sigmoid"``) or IPO (``"ipo"``) loss of a batch of preference pairs.

    Args:
        beta: the strength of the pull toward the reference (DPO's β, IPO's τ); larger stays closer.
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"``.
        label_smoothing: the probability ``ε`` in [0, 0.5) that a pair's preference is flipped (conservative
            DPO); ``"sigmoid"`` only.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only: set it to 0 for IPO")

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], chunk_tokens: int | None = None) -> PairLosses:
        """The losses of a batch of pairs (``input_ids``, ``attention_mask``, ``labels``: chosen rows, then
        rejected rows; ``reference_logps``: the reference's sequence log-probabilities in the same order).

        One forward of ``model`` over all rows; ``chunk_tokens`` computes its log-probabilities that many
        tokens at a time (:func:`~lomo_lightning.objectives.causal_lm.token_log_probs`).
        """
        if REFERENCE_KEY not in batch:
            raise ValueError(
                f"a DPO batch needs {REFERENCE_KEY!r}, the reference model's sequence log-probabilities: train "
                "on a preference data module (DPOModule computes them before training) or add them with "
                "lomo_lightning.objectives.reference_log_probs and a PreferenceCollator"
            )
        policy = sequence_log_probs(
            model, batch["input_ids"], batch["labels"], chunk_tokens, attention_mask=batch.get("attention_mask")
        )
        response_tokens = (next_token_targets(batch["labels"]) != IGNORE_INDEX).sum(-1)
        return self.pair_losses(policy, batch[REFERENCE_KEY], response_tokens)

    def pair_losses(self, policy_logps: Tensor, reference_logps: Tensor, response_tokens: Tensor) -> PairLosses:
        """The losses from summed sequence log-probabilities (each of shape ``(2 * pairs,)``, chosen first)."""
        policy_chosen, policy_rejected = policy_logps.chunk(2)
        reference_chosen, reference_rejected = reference_logps.to(policy_logps).chunk(2)
        chosen_ratio = policy_chosen - reference_chosen
        rejected_ratio = policy_rejected - reference_rejected
        if self.loss_type == "ipo":
            chosen_tokens, rejected_tokens = response_tokens.clamp(min=1).to(policy_logps).chunk(2)
            difference = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
            losses = (difference - 1 / (2 * self.beta)) ** 2
        else:
            difference = self.beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - self.label_smoothing) * F.logsigmoid(difference) - self.label_smoothing * F.logsigmoid(
                -difference
            )
        return PairLosses(losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())


REWARD_METRICS = ("chosen", "rejected", "accuracies", "margins")


def reward_metrics(pairs: PairLosses) -> dict[str, Tensor]:
    """Per-pair values of TRL's ``rewards/<name>`` metrics (average them to log): chosen, rejected, accuracies, margins."""
    return {
        "chosen": pairs.chosen_rewards,
        "rejected": pairs.rejected_rewards,
        "accuracies": (pairs.chosen_rewards > pairs.rejected_rewards).float(),
        "margins": pairs.chosen_rewards - pairs.rejected_rewards,
    }


__all__ = ["DPOObjective", "LOSS_TYPES", "PairLosses", "REFERENCE_KEY", "REWARD_METRICS", "reward_metrics"]
