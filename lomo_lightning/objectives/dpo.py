"""Direct preference optimization: TRL's pairwise loss types, of a policy against fixed reference log-probabilities.

For a prompt ``x`` with a chosen response ``y_w`` and a rejected one ``y_l``, ``log π(y|x)`` the sum of the
response tokens' log-probabilities, the log-ratios are ``ρ_w = log π(y_w|x) - log π_ref(y_w|x)`` and
``ρ_l`` likewise, the implicit rewards ``r = β ρ`` and ``h = ρ_w - ρ_l``. Per pair, with TRL's names:

- ``sigmoid`` (DPO, Rafailov et al., 2023, eq. 7): ``-log σ(β h)``; with label smoothing ``ε`` the
  conservative DPO (cDPO, Mitchell, 2023) that TRL ≤ 0.28 had: ``-(1 - ε) log σ(β h) - ε log σ(-β h)``;
- ``robust`` (rDPO, Chowdhury et al., 2024, eq. 3): ``((1 - ε)(-log σ(β h)) - ε(-log σ(-β h))) / (1 - 2ε)``;
- ``hinge`` (SLiC, Zhao et al., 2023): ``max(0, 1 - β h)``;
- ``ipo`` (Azar et al., 2023, eq. 17, ``τ = β``): ``(h̄ - 1 / (2β))²``, where ``h̄`` takes each response's
  log-ratio averaged over its tokens (as TRL does, confirmed there with IPO's authors);
- ``sigmoid_norm``: ``-log σ(β h̄)``, DPO on the length-normalized ``h̄``;
- ``apo_zero`` / ``apo_down`` (D'Oosterlinck et al., 2024, eqs. 7 and 8): ``1 - σ(β ρ_w) + σ(β ρ_l)`` /
  ``σ(β ρ_w) + 1 - σ(β h)``;
- ``sft``: the negative log-likelihood of the chosen responses, averaged over all their tokens in the batch.

Several loss types combine as a weighted sum (``loss_weights``, 1 each by default); ``rpo_alpha`` adds
``sft`` with that weight (RPO, Pang et al., 2024, as TRL ≤ 0.28 had it). With ``reference_free`` the
reference log-probabilities are taken as 0 (the implicit reference is uniform).

The reported metrics are TRL's: ``rewards/{chosen,rejected,margins,accuracies}`` from the summed
log-ratios for every loss type (``accuracies``: ``r_w > r_l``, a tie counts as wrong),
``logps/{chosen,rejected}`` (the policy's summed log-probabilities) and ``logits/{chosen,rejected}`` (the
logits averaged over the vocabulary and over every response token).

Chosen and rejected responses go through the model as one batch (chosen rows first), so that one
forward and one backward serve both sides of every pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lomo_lightning.objectives.causal_lm import IGNORE_INDEX, ChunkTokens, next_token_targets, token_log_probs_and_mean_logits

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down", "sft")
# label smoothing means something for these only; elsewhere it would be silently ignored, so it is refused
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")
# The batch key of the reference's sequence log-probabilities (chosen rows, then rejected rows)
REFERENCE_KEY = "reference_logps"
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


class PairLosses(NamedTuple):
    """One value per pair: the loss (differentiable), and what TRL's metrics are made of (detached)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    # sums over each response's tokens of the logits averaged over the vocabulary, and the responses' lengths
    chosen_logit_sums: Tensor
    rejected_logit_sums: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


@dataclass(frozen=True)
class DPOObjective:
    """TRL's pairwise preference losses of a batch of pairs (see the module docstring for the formulas).

    Args:
        beta: the strength of the pull toward the reference (DPO's β, IPO's τ); larger stays closer.
        loss_type: one of :data:`LOSS_TYPES`, or a list of them (summed with ``loss_weights``).
        loss_weights: one weight per loss type (default: 1 each).
        label_smoothing: the probability ``ε`` in [0, 0.5) that a pair's preference is flipped: cDPO for
            ``"sigmoid"``, rDPO for ``"robust"``; refused with other loss types.
        rpo_alpha: the weight of an added ``sft`` term (RPO); ``None``: none.
        reference_free: take the reference log-probabilities as 0 (no reference pass is needed).
    """

    beta: float = 0.1
    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    reference_free: bool = False
    # (loss type, weight) pairs, rpo_alpha's sft term included: set by __post_init__
    weighted_loss_types: tuple[tuple[str, float], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        unknown = [name for name in types if name not in LOSS_TYPES]
        if unknown or not types:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)} (or a list of them), got {self.loss_type!r}")
        weights = (1.0,) * len(types) if self.loss_weights is None else tuple(float(w) for w in self.loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"loss_weights needs one weight per loss type: {len(weights)} for {len(types)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and not set(types) <= set(SMOOTHED_LOSS_TYPES):
            raise ValueError(
                f"label_smoothing applies to loss_type={' or '.join(map(repr, SMOOTHED_LOSS_TYPES))} only: set it to 0 for "
                f"{', '.join(t for t in types if t not in SMOOTHED_LOSS_TYPES)}"
            )
        if self.rpo_alpha is not None:
            types, weights = (*types, "sft"), (*weights, float(self.rpo_alpha))
        object.__setattr__(self, "weighted_loss_types", tuple(zip(types, weights)))

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], chunk_tokens: ChunkTokens = None) -> PairLosses:
        """The losses of a batch of pairs (``input_ids``, ``attention_mask``, ``labels``: chosen rows, then
        rejected rows; ``reference_logps``: the reference's sequence log-probabilities in the same order,
        unless ``reference_free``).

        One forward of ``model`` over all rows; ``chunk_tokens`` computes its log-probabilities that many
        tokens at a time (:func:`~lomo_lightning.objectives.causal_lm.token_log_probs`).
        """
        if REFERENCE_KEY not in batch and not self.reference_free:
            raise ValueError(
                f"a DPO batch needs {REFERENCE_KEY!r}, the reference model's sequence log-probabilities: train "
                "on a preference data module (DPOModule computes them before training) or add them with "
                "lomo_lightning.objectives.reference_log_probs and a PreferenceCollator"
            )
        log_probs, mean_logits = token_log_probs_and_mean_logits(
            model, batch["input_ids"], batch["labels"], chunk_tokens, attention_mask=batch.get("attention_mask")
        )
        in_response = next_token_targets(batch["labels"]) != IGNORE_INDEX
        policy = log_probs.sum(-1)
        reference = torch.zeros_like(policy) if self.reference_free else batch[REFERENCE_KEY]
        pairs = self.pair_losses(policy, reference, in_response.sum(-1))
        chosen_logit_sums, rejected_logit_sums = (mean_logits * in_response).sum(-1).chunk(2)
        return pairs._replace(chosen_logit_sums=chosen_logit_sums, rejected_logit_sums=rejected_logit_sums)

    def pair_losses(self, policy_logps: Tensor, reference_logps: Tensor, response_tokens: Tensor) -> PairLosses:
        """The losses from summed sequence log-probabilities (each of shape ``(2 * pairs,)``, chosen first) and
        the number of tokens of each response; the logit metrics are left at 0."""
        policy_chosen, policy_rejected = policy_logps.chunk(2)
        reference_chosen, reference_rejected = reference_logps.to(policy_logps).chunk(2)
        chosen_ratio = policy_chosen - reference_chosen
        rejected_ratio = policy_rejected - reference_rejected
        chosen_tokens, rejected_tokens = response_tokens.chunk(2)
        losses = sum(
            weight * self._losses(name, policy_chosen, chosen_ratio, rejected_ratio, chosen_tokens, rejected_tokens)
            for name, weight in self.weighted_loss_types
        )
        assert isinstance(losses, Tensor)  # at least one loss type
        zeros = torch.zeros_like(chosen_ratio).detach()
        return PairLosses(
            losses,
            self.beta * chosen_ratio.detach(),
            self.beta * rejected_ratio.detach(),
            policy_chosen.detach(),
            policy_rejected.detach(),
            zeros,
            zeros,
            chosen_tokens,
            rejected_tokens,
        )

    def _losses(
        self, name: str, policy_chosen: Tensor, chosen_ratio: Tensor, rejected_ratio: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor
    ) -> Tensor:
        """Per-pair losses of one loss type."""
        beta, epsilon = self.beta, self.label_smoothing
        if name in ("ipo", "sigmoid_norm"):
            difference = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            return (difference - 1 / (2 * beta)) ** 2 if name == "ipo" else -F.logsigmoid(beta * difference)
        logits = beta * (chosen_ratio - rejected_ratio)
        if name == "sigmoid":
            return -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)
        if name == "robust":
            return (-(1 - epsilon) * F.logsigmoid(logits) + epsilon * F.logsigmoid(-logits)) / (1 - 2 * epsilon)
        if name == "hinge":
            return torch.relu(1 - logits)
        if name == "apo_zero":
            return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
        if name == "apo_down":
            return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(logits)
        assert name == "sft", name  # checked in __post_init__
        # the mean negative log-likelihood over every chosen token of the batch, the same for each pair
        return (-policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)).expand_as(policy_chosen)


def pair_metrics(pairs: PairLosses) -> dict[str, tuple[Tensor, Tensor]]:
    """TRL's metrics of a batch as ``(values, weights)`` per name (:data:`METRICS`).

    The metric is ``sum(values * weights) / sum(weights)`` over every pair of every rank: a mean over pairs,
    and for ``logits/*`` a mean over response tokens, as TRL gathers them.
    """
    ones = torch.ones_like(pairs.chosen_rewards)
    chosen_tokens, rejected_tokens = pairs.chosen_tokens.to(ones), pairs.rejected_tokens.to(ones)
    return {
        "rewards/chosen": (pairs.chosen_rewards, ones),
        "rewards/rejected": (pairs.rejected_rewards, ones),
        "rewards/accuracies": ((pairs.chosen_rewards > pairs.rejected_rewards).to(ones), ones),
        "rewards/margins": (pairs.chosen_rewards - pairs.rejected_rewards, ones),
        "logps/chosen": (pairs.chosen_logps, ones),
        "logps/rejected": (pairs.rejected_logps, ones),
        "logits/chosen": (pairs.chosen_logit_sums / chosen_tokens.clamp(min=1), chosen_tokens),
        "logits/rejected": (pairs.rejected_logit_sums / rejected_tokens.clamp(min=1), rejected_tokens),
    }


__all__ = ["DPOObjective", "LOSS_TYPES", "METRICS", "PairLosses", "REFERENCE_KEY", "SMOOTHED_LOSS_TYPES", "pair_metrics"]
