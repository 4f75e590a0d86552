"""Each loss type, the rewards, the log-probabilities and TRL's metrics, computed by TRL's own DPOTrainer code and by
this project's on the same model and pairs: equal within float rounding."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, tiny_llama

from lomo_lightning.data import PreferenceCollator
from lomo_lightning.objectives import LOSS_TYPES, DPOObjective, pair_metrics

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is in the dev extra")
trl_utils = pytest.importorskip("trl.trainer.utils")

PAD = 0


class OneProcess:
    """What DPOTrainer asks of its Accelerator, for one process: gathering is the identity."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather


def tokenized_pairs(n: int = 5, seed: int = 0) -> list[dict]:
    """Pairs as TRL tokenizes them (prompt, chosen and rejected ids, of different lengths) with made-up reference values."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(2, VOCAB, (length,), generator=generator).tolist()

    reference = (-30 + 5 * torch.randn(n, 2, generator=generator, dtype=torch.float64)).tolist()
    return [
        {
            "prompt_ids": ids(3 + i % 4),
            "chosen_ids": ids(2 + (3 * i) % 7),
            "rejected_ids": ids(4 + (5 * i) % 6),
            "ref_chosen_logps": reference[i][0],
            "ref_rejected_logps": reference[i][1],
        }
        for i in range(n)
    ]


def trl_step(pairs: list[dict], loss_types: list[str], loss_weights: list[float], beta: float, label_smoothing: float):
    """TRL's DPOTrainer._compute_loss on a fresh tiny Llama: the loss, its gradients and TRL's logged metrics."""
    model = tiny_llama(tie=True, seed=0)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = SimpleNamespace(
        model=model,
        accelerator=OneProcess(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = trl_dpo.DataCollatorForPreference(pad_token_id=PAD)(pairs)
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), [p.grad for p in model.parameters()], metrics


def our_step(pairs: list[dict], objective: DPOObjective, reference_free: bool = False):
    model = tiny_llama(tie=True, seed=0)
    rows = [
        {
            **{f"{side}_input_ids": p["prompt_ids"] + p[f"{side}_ids"] for side in ("chosen", "rejected")},
            **{f"{side}_labels": [-100] * len(p["prompt_ids"]) + p[f"{side}_ids"] for side in ("chosen", "rejected")},
            "reference_logps": [p["ref_chosen_logps"], p["ref_rejected_logps"]],
        }
        for p in pairs
    ]
    batch = PreferenceCollator(PAD)(rows)
    if reference_free:
        del batch["reference_logps"]
    result = objective(model, batch)
    loss = result.losses.mean()
    loss.backward()
    metrics = {name: float((v * w).sum() / w.sum()) for name, (v, w) in pair_metrics(result).items()}
    return loss.detach(), [p.grad for p in model.parameters()], metrics


CASES = {
    # id: (our objective, TRL's loss types, weights, label smoothing)
    **{name: (DPOObjective(beta=0.2, loss_type=name), [name], [1.0], 0.0) for name in LOSS_TYPES},
    "robust_smoothed": (DPOObjective(beta=0.2, loss_type="robust", label_smoothing=0.2), ["robust"], [1.0], 0.2),
    "list": (DPOObjective(beta=0.3, loss_type=["sigmoid", "ipo", "apo_zero"], loss_weights=[1.0, 0.25, 2.0]),
             ["sigmoid", "ipo", "apo_zero"], [1.0, 0.25, 2.0], 0.0),
    "rpo_alpha": (DPOObjective(beta=0.1, rpo_alpha=0.5), ["sigmoid", "sft"], [1.0, 0.5], 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_and_metrics_equal_trls(case):
    objective, loss_types, weights, smoothing = CASES[case]
    pairs = tokenized_pairs()
    trl_loss, trl_grads, trl_metrics = trl_step(pairs, loss_types, weights, objective.beta, smoothing)
    loss, grads, metrics = our_step(pairs, objective)

    torch.testing.assert_close(loss, trl_loss.to(loss), rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads, trl_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert set(metrics) <= set(trl_metrics), "every metric under TRL's name"
    for name, value in metrics.items():
        assert value == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-5), name
    assert 0 < metrics["rewards/accuracies"] < 1 and abs(metrics["rewards/margins"]) > 1e-3, "a case that tells"


def test_reference_free_equals_trl_with_a_reference_of_zero_log_probabilities():
    pairs = [{**p, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for p in tokenized_pairs()]
    trl_loss, _, trl_metrics = trl_step(pairs, ["sigmoid"], [1.0], 0.1, 0.0)
    loss, _, metrics = our_step(tokenized_pairs(), DPOObjective(beta=0.1, reference_free=True), reference_free=True)
    torch.testing.assert_close(loss, trl_loss.to(loss), rtol=1e-6, atol=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-5)
