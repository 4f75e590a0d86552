"""DPO and IPO: the losses of the papers from summed token log-probabilities, reference log-probabilities cached
exactly, and fused training equal to unfused training."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, preference_pairs, tiny_llama
from datasets import Dataset
from torch.utils.data import DataLoader

from lomo_lightning import AdaLomo, LomoStrategy
from lomo_lightning.data import PreferenceCollator, PreferencePairs
from lomo_lightning.dpo_module import REFERENCE_CHECKPOINT_KEY, DPOModule, FusedDPOModule
from lomo_lightning.objectives import METRICS, DPOObjective, add_reference_log_probs, reference_log_probs
from lomo_lightning.objectives.reference import weights_digest

EOS = 1
PAD = 0


def response_log_prob(model: torch.nn.Module, input_ids: list[int], labels: list[int]) -> torch.Tensor:
    """log p(response | prompt) of one unpadded sequence: its own forward, log-softmax, the response tokens summed."""
    logits = model(torch.tensor([input_ids])).logits[0, :-1].double()
    targets = torch.tensor(input_ids[1:])
    token_log_probs = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    in_response = torch.tensor(labels[1:]) != -100
    return token_log_probs[in_response].sum()


def paper_loss(objective: DPOObjective, policy, reference, pair) -> torch.Tensor:
    """One pair's loss as the DPO (with label smoothing) and IPO papers write it, from summed log-probabilities."""
    (pw, pl_), (rw, rl) = policy, reference
    if objective.loss_type == "ipo":
        tokens_w = sum(label != -100 for label in pair["chosen_labels"])
        tokens_l = sum(label != -100 for label in pair["rejected_labels"])
        h = (pw - rw) / tokens_w - (pl_ - rl) / tokens_l
        return (h - 1 / (2 * objective.beta)) ** 2
    h = (pw - rw) - (pl_ - rl)
    eps, beta = objective.label_smoothing, objective.beta
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


@pytest.mark.parametrize("chunk_tokens", [None, 7])
@pytest.mark.parametrize(
    "objective",
    [DPOObjective(beta=0.1), DPOObjective(beta=0.5, label_smoothing=0.2), DPOObjective(beta=0.3, loss_type="ipo")],
    ids=["dpo", "dpo_smoothed", "ipo"],
)
def test_losses_rewards_and_gradients_equal_an_independent_computation(objective, chunk_tokens):
    """Every pair is evaluated alone, unpadded; the batch pads both sides and runs them in one forward."""
    pairs = preference_pairs(4)
    policy, reference_model = tiny_llama(tie=True, seed=0), tiny_llama(tie=True, seed=1)
    independent_policy = tiny_llama(tie=True, seed=0)
    with torch.no_grad():
        reference = [
            [response_log_prob(reference_model, p[f"{side}_input_ids"], p[f"{side}_labels"]) for side in ("chosen", "rejected")]
            for p in pairs
        ]

    expected_losses, expected_rewards = [], []
    for pair, ref in zip(pairs, reference):
        logps = [response_log_prob(independent_policy, pair[f"{side}_input_ids"], pair[f"{side}_labels"]) for side in ("chosen", "rejected")]
        expected_losses.append(paper_loss(objective, logps, ref, pair))
        expected_rewards.append([objective.beta * (logps[i] - ref[i]).detach() for i in range(2)])
    expected = torch.stack(expected_losses).mean()
    expected.backward()

    batch = PreferenceCollator(PAD)([{**p, "reference_logps": [float(r[0]), float(r[1])]} for p, r in zip(pairs, reference)])
    assert batch["input_ids"].shape[0] == 8 and (batch["attention_mask"] == 0).any(), "both sides padded in one batch"
    got = objective(policy, batch, chunk_tokens)
    loss = got.losses.mean()
    loss.backward()

    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    rewards = torch.tensor([[float(chosen), float(rejected)] for chosen, rejected in expected_rewards])
    torch.testing.assert_close(torch.stack([got.chosen_rewards, got.rejected_rewards], 1).double(), rewards.double(), rtol=1e-4, atol=1e-5)
    assert got.chosen_rewards.abs().max() > 1e-2, "the reference differs from the policy: rewards are not zero"
    for (name, p), q in zip(independent_policy.named_parameters(), policy.parameters()):
        torch.testing.assert_close(q.grad.double(), p.grad.double(), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_type": "kto"}, "loss_type must be one of sigmoid, ipo, hinge"),
        ({"beta": 0.0}, "beta must be positive"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "applies to loss_type=.sigmoid. or .robust. only"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "one weight per loss type"),
    ],
)
def test_bad_objective_settings_fail_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        DPOObjective(**options)


def test_a_batch_without_reference_log_probs_is_refused():
    batch = PreferenceCollator(PAD)(preference_pairs(2))
    with pytest.raises(ValueError, match="reference_logps"):
        DPOObjective()(tiny_llama(), batch)


class ForwardCounter:
    """Counts the decoder's forward passes (the chunked log-probabilities bypass the top model's forward)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        model.base_model.register_forward_hook(self.count)

    def count(self, *args) -> None:
        self.calls += 1


def test_cached_reference_log_probs_equal_a_fresh_pass_and_are_read_back_without_a_forward(tmp_path):
    pairs = Dataset.from_list(preference_pairs(7))
    model = tiny_llama(tie=True)
    counter = ForwardCounter(model)
    first = reference_log_probs(model, pairs, PreferenceCollator(PAD), batch_size=3, cache_dir=tmp_path)
    assert counter.calls == 3, "one forward per batch of pairs"
    assert len(list((tmp_path / "reference_logps").glob("*.safetensors"))) == 1

    with torch.no_grad():
        fresh = torch.tensor(
            [[float(response_log_prob(model, p[f"{s}_input_ids"], p[f"{s}_labels"])) for s in ("chosen", "rejected")] for p in pairs]
        )
    torch.testing.assert_close(first.double(), fresh.double(), rtol=1e-5, atol=1e-5)

    calls = counter.calls
    again = reference_log_probs(model, pairs, PreferenceCollator(PAD), batch_size=3, cache_dir=tmp_path)
    assert counter.calls == calls, "a cache hit runs no forward"
    assert torch.equal(again, first)
    assert model.training, "the pass runs in eval mode and leaves the mode as it was"


def test_a_change_of_data_model_or_settings_gets_its_own_cache_entry(tmp_path):
    rows = preference_pairs(5)
    model = tiny_llama()
    counter = ForwardCounter(model)

    def compute(dataset_rows, batch_size=2, chunk_tokens=None):
        return reference_log_probs(
            model, Dataset.from_list(dataset_rows), PreferenceCollator(PAD), batch_size=batch_size, cache_dir=tmp_path, chunk_tokens=chunk_tokens
        )

    base = compute(rows)
    calls = counter.calls
    changed_rows = [dict(row) for row in rows]
    token = (rows[3]["rejected_input_ids"][-2] + 1) % VOCAB  # one response token, in the input and the label
    changed_rows[3] = {
        **rows[3],
        "rejected_input_ids": rows[3]["rejected_input_ids"][:-2] + [token, EOS],
        "rejected_labels": rows[3]["rejected_labels"][:-2] + [token, EOS],
    }
    changed = compute(changed_rows)
    assert counter.calls > calls and changed[3, 1] != base[3, 1] and torch.equal(changed[:3], base[:3])

    for change in [lambda: compute(rows, batch_size=3), lambda: compute(rows, chunk_tokens=4)]:
        calls = counter.calls
        torch.testing.assert_close(change(), base, rtol=1e-5, atol=1e-5)  # the same values, recomputed
        assert counter.calls > calls
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3  # the model changed: another reference
    calls = counter.calls
    assert not torch.equal(compute(rows), base) and counter.calls > calls
    assert len(list((tmp_path / "reference_logps").glob("*.safetensors"))) == 5
    assert not list((tmp_path / "reference_logps").glob(".*")), "no staging file is left behind"


def pair_batches(tmp_path, steps: int, pairs_per_batch: int = 3) -> list[dict[str, torch.Tensor]]:
    """Batches of pairs with the reference log-probabilities of the untrained model."""
    dataset = Dataset.from_list(preference_pairs(steps * pairs_per_batch, seed=5))
    collator = PreferenceCollator(PAD)
    values = reference_log_probs(tiny_llama(tie=True), dataset, collator, batch_size=pairs_per_batch, cache_dir=tmp_path)
    dataset = add_reference_log_probs(dataset, values)
    return [collator(list(dataset.select(range(i * pairs_per_batch, (i + 1) * pairs_per_batch)))) for i in range(steps)]


def train(module: pl.LightningModule, batches, strategy, clip: float | None) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_epochs=1,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))


@pytest.mark.parametrize("chunk_tokens", [None, 5])
def test_fused_dpo_training_equals_unfused_training(tmp_path, chunk_tokens):
    """AdaLomo fused into backward (two-pass clipping) gives the parameters of automatic optimization with Trainer clipping."""
    clip = 0.05
    optimizer = functools.partial(AdaLomo, lr=1e-2, weight_decay=0.01)
    batches = pair_batches(tmp_path, steps=3)
    probe = tiny_llama(tie=True)
    DPOObjective(beta=0.5)(probe, batches[0]).losses.mean().backward()
    assert torch.nn.utils.get_total_norm([p.grad for p in probe.parameters()]) > clip, "the case must exercise clipping"
    unfused = DPOModule(tiny_llama(tie=True), optimizer=optimizer, loss_chunk_tokens=chunk_tokens, beta=0.5)
    fused = FusedDPOModule(tiny_llama(tie=True), optimizer=optimizer, loss_chunk_tokens=chunk_tokens, beta=0.5)
    train(unfused, batches, "auto", clip)
    train(fused, batches, LomoStrategy(clip_grad_norm=clip), None)
    moved = max((p - q).abs().max().item() for p, q in zip(unfused.model.parameters(), tiny_llama(tie=True).parameters()))
    assert moved > 1e-3, "training must move the parameters"
    for (name, p), q in zip(unfused.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


class PairsDataModule(PreferencePairs, pl.LightningDataModule):
    """Ready-made tokenized pairs as a preference data module: what DPOModule.setup needs of one."""

    def __init__(self, cache_dir, batch_size: int = 3):
        super().__init__()
        self.train_dataset = Dataset.from_list(preference_pairs(9, seed=5))
        self.val_dataset = Dataset.from_list(preference_pairs(6, seed=6))
        self.batch_size, self.cache_dir = batch_size, cache_dir

    def collator(self):
        return PreferenceCollator(PAD)

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size, collate_fn=self.collator())

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=self.collator())


def dpo_trainer(**options) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        **{"enable_checkpointing": False, **options},
    )


def validation_rewards(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items() if name.startswith("val/")}


def test_validate_after_fit_reproduces_the_last_validation_of_fit_and_refuses_when_the_reference_is_gone(tmp_path):
    """The reference is the model at the start of training, also for every later stage: never the trained weights."""
    datamodule = PairsDataModule(tmp_path / "cache")
    module = DPOModule(tiny_llama(tie=True), optimizer=functools.partial(torch.optim.AdamW, lr=3e-2), beta=0.5)
    trainer = dpo_trainer()
    trainer.fit(module, datamodule=datamodule)
    at_the_end_of_fit = validation_rewards(trainer.callback_metrics)
    assert abs(at_the_end_of_fit["val/rewards/margins"]) > 1e-3, "training moved the policy away from its reference"
    assert set(at_the_end_of_fit) >= {f"val/{name}" for name in METRICS}

    (again,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    assert validation_rewards(again) == pytest.approx(at_the_end_of_fit, rel=1e-6, abs=1e-7)

    for entry in (tmp_path / "cache" / "reference_logps").glob("*.safetensors"):
        entry.unlink()
    with pytest.raises(RuntimeError, match=r"^the reference log-probabilities of the model at the start of training .* trained since"):
        trainer.validate(module, datamodule=datamodule, verbose=False)


def test_a_checkpoint_names_its_reference_and_a_module_loaded_from_it_validates_against_that_reference(tmp_path):
    datamodule = PairsDataModule(tmp_path / "cache")
    module = DPOModule(tiny_llama(tie=True), optimizer=functools.partial(torch.optim.AdamW, lr=3e-2), beta=0.5)
    trainer = dpo_trainer()
    trainer.fit(module, datamodule=datamodule)
    expected = validation_rewards(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    assert torch.load(tmp_path / "trained.ckpt", weights_only=True)[REFERENCE_CHECKPOINT_KEY] == weights_digest(tiny_llama(tie=True))

    trained = DPOModule(tiny_llama(tie=True, seed=3), optimizer=functools.partial(torch.optim.AdamW, lr=3e-2), beta=0.5)
    (metrics,) = dpo_trainer().validate(trained, datamodule=PairsDataModule(tmp_path / "cache"), ckpt_path=tmp_path / "trained.ckpt", verbose=False, weights_only=True)
    assert validation_rewards(metrics) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_dropout_is_off_by_default_as_in_trl():
    model = tiny_llama()
    model.model.dropout_probe = torch.nn.Dropout(0.3)
    DPOModule(model, optimizer=torch.optim.SGD)
    assert model.model.dropout_probe.p == 0.0
    kept = tiny_llama()
    kept.model.dropout_probe = torch.nn.Dropout(0.3)
    DPOModule(kept, optimizer=torch.optim.SGD, disable_dropout=False)
    assert kept.model.dropout_probe.p == 0.3


def test_an_explicit_reference_checkpoint_gives_the_reference_values_and_reference_free_needs_none(tmp_path):
    reference = tiny_llama(tie=True, seed=1)
    reference.save_pretrained(tmp_path / "reference")
    datamodule = PairsDataModule(tmp_path / "cache")
    expected = reference_log_probs(reference, datamodule.val_dataset, PreferenceCollator(PAD), batch_size=3, cache_dir=tmp_path / "other")
    module = DPOModule(tiny_llama(tie=True), optimizer=torch.optim.SGD, reference_model=str(tmp_path / "reference"))
    dpo_trainer().validate(module, datamodule=datamodule, verbose=False)
    torch.testing.assert_close(torch.tensor(datamodule.val_dataset["reference_logps"]), expected)

    free = DPOModule(tiny_llama(tie=True), optimizer=torch.optim.SGD, reference_free=True)
    free_data = PairsDataModule(tmp_path / "free_cache")
    (metrics,) = dpo_trainer().validate(free, datamodule=free_data, verbose=False)
    assert not (tmp_path / "free_cache").exists() and "reference_logps" not in free_data.val_dataset.column_names
    assert metrics["val/rewards/chosen"] == pytest.approx(0.1 * metrics["val/logps/chosen"], rel=1e-5), "r = beta * log pi"
    with pytest.raises(ValueError, match="reference_free and reference_model exclude each other"):
        DPOModule(tiny_llama(), optimizer=torch.optim.SGD, reference_free=True, reference_model="x")
