"""Sparse fine-tuning as SpIEL's reference does it (AlanAnsell/peft ``tuners/sft``).

fp32 deltas beside a frozen base: every inactive entry is the base's, weight decay pulls toward the base,
the first reselection replaces the random start, AG seeds regrown moments for a bias correction by age,
MA grows the largest outer products of the SM3 accumulators. Where the test needs the gradient of the
effective weight, it takes it from a plain copy of the model (the deltas merged), not from the layer.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import batches, tiny_llama
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lomo_lightning import SM3, AdaLomo, FusedUpdater, Lomo, LomoStrategy, SFTAdamW
from lomo_lightning.callbacks import SFTReselectionCallback
from lomo_lightning.selection import SparseFineTuning, apply_sparse_delta, delta_size_report
from lomo_lightning.selection.sft import SFTConfig, SparseDeltaLinear, merge_sparse_deltas
from lomo_lightning.strategies import save_pretrained_consolidated

BATCHES = batches(24)
RULES = {
    "sft_adamw": lambda params: SFTAdamW(params, lr=1e-2, weight_decay=0.1),
    "sm3": lambda params: SM3(params, lr=1e-2, momentum=0.5, weight_decay=0.1),
    "adalomo": lambda params: AdaLomo(params, lr=1.0, weight_decay=0.1),  # relative to RMS(delta), floored at 1e-3
    "lomo": lambda params: Lomo(params, lr=0.05, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}
REGROWTH_OF = {"sm3": "sm3"}  # SpIEL-MA needs the SM3 rule; every rule works with accumulated gradients


def sparse(regrowth: str = "accumulated_gradients", **overrides) -> SparseFineTuning:
    options = dict(density=0.05, regrowth=regrowth, reselection_steps=4, selection_accumulation_steps=2, total_steps=24)
    return SparseFineTuning(**(options | overrides))


def train(model: nn.Module, sft: SparseFineTuning, optimizer, steps: range, fused: bool = True, **engine) -> list[int]:
    """Train on ``BATCHES[steps]``, stepping the selection after every step; returns what each step replaced."""
    updater = FusedUpdater(model, optimizer, **engine) if fused else None
    replaced = []
    for index in steps:
        loss = model(**BATCHES[index]).loss
        if updater is not None:
            assert updater.backward(loss)
        else:
            loss.backward()
            if engine.get("clip_grad_norm") is not None:
                torch.nn.utils.clip_grad_norm_(sft.parameters(), engine["clip_grad_norm"])
            optimizer.step()
            optimizer.zero_grad()
        replaced.append(sft.step(optimizer))
    if updater is not None:
        updater.remove()
    return replaced


def plain_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model as a plain Llama, each sparse layer's weight merged: what it computes with."""
    copy = tiny_llama(dtype=dtype)
    copy.load_state_dict(merge_sparse_deltas(model, model.state_dict()))
    return copy


def dense_gradients(model: nn.Module, sft: SparseFineTuning, batch: dict) -> dict[str, torch.Tensor]:
    """The gradient of every sparse layer's effective weight, flat, from a plain copy of the model."""
    copy = plain_copy(model)
    copy(**batch).loss.backward()
    return {name: copy.get_submodule(name).weight.grad.view(-1) for name in sft.layers}


def effective_weights(sft: SparseFineTuning) -> dict[str, torch.Tensor]:
    return {name: layer.merged_weight() for name, layer in sft.layers.items()}


def active(layer: SparseDeltaLinear) -> set[int]:
    return set(layer.indices.tolist())


# -- the budget and the layers -----------------------------------------------------------------


def test_budget_is_a_density_of_all_parameters_or_exactly_num_tunable_weights():
    for tie in (False, True):
        model = tiny_llama(tie=tie)
        every = sum(p.numel() for p in model.parameters())  # a tied embedding counts once
        assert SparseFineTuning(density=0.05).apply(model).budget == int(0.05 * every)
    model = tiny_llama()
    sft = SparseFineTuning(num_tunable_weights=1234).apply(model)
    assert sft.budget == 1234
    sizes = {name: layer.weight.numel() for name, layer in sft.layers.items()}
    for name, layer in sft.layers.items():
        assert abs(layer.values.numel() - 1234 * sizes[name] / sum(sizes.values())) < 1, name
        assert layer.indices.dtype == torch.int32 and torch.equal(layer.indices, layer.indices.unique()), "distinct, sorted"


def test_every_linear_layer_but_the_lm_head_gets_a_delta_and_only_the_deltas_train():
    model = tiny_llama()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    sft = sparse().apply(model)
    assert len(sft.layers) == 2 * 7 and all(name.startswith("model.layers.") and name.endswith("_proj") for name in sft.layers)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {f"{name}.values" for name in sft.layers}
    assert all(layer.values.dtype == torch.float32 and not layer.values.any() for layer in sft.layers.values())
    for name, p in model.named_parameters():  # the base stays in place, under its own name
        if not name.endswith(".values"):
            assert torch.equal(p, start[name]), name


def test_only_active_entries_leave_the_base_and_pruned_entries_return_to_it_exactly():
    model = tiny_llama()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    sft = sparse().apply(model)
    optimizer = SFTAdamW(model.parameters(), lr=1e-2)
    train(model, sft, optimizer, range(9))  # reselections after steps 2 and 6
    before = {name: active(layer) for name, layer in sft.layers.items()}
    moved = effective_weights(sft)
    train(model, sft, optimizer, range(9, 10))  # the reselection after step 10
    for name, layer in sft.layers.items():
        w0 = base[f"{name}.weight"].view(-1)
        assert torch.equal(layer.weight.view(-1), w0), "the base never changes"
        effective = layer.merged_weight().view(-1)
        changed = set((effective != w0).nonzero().squeeze(1).tolist())
        assert changed and changed <= active(layer), name
        pruned = sorted(before[name] - active(layer))
        assert pruned and torch.equal(effective[pruned], w0[pruned]), name
        assert not torch.equal(moved[name].view(-1)[pruned], w0[pruned]), "they had moved"


# -- the reference's schedule ------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_reselections_follow_the_reference_schedule(schedule):
    R, A, T = 5, 2, 18
    model = tiny_llama()
    sft = SparseFineTuning(
        density=0.05, regrowth="sm3", reselection_steps=R, selection_accumulation_steps=A, total_steps=T, prune_schedule=schedule
    ).apply(model)
    replaced = train(model, sft, SM3(model.parameters(), lr=1e-3), range(22))

    def fraction(step: int) -> float:
        if step == A:
            return 1.0  # the first reselection replaces the random start
        return 0.2 * (1 - step / T) if schedule == "linear" else 0.2 * 0.5 * (1 + math.cos(math.pi * step / T))

    ks = [layer.values.numel() for layer in sft.layers.values()]
    expected = {step: sum(int(k * fraction(step)) for k in ks) for step in (2, 7, 12, 17)}  # R*n + A, up to T
    assert {step: count for step, count in enumerate(replaced, start=1) if count} == {s: n for s, n in expected.items() if n}


def test_accumulated_gradients_are_watched_over_the_reference_windows():
    model = tiny_llama()
    sft = sparse(reselection_steps=5, selection_accumulation_steps=2, total_steps=14).apply(model)
    optimizer = SFTAdamW(model.parameters(), lr=1e-2)
    watched = []
    for step in range(1, 18):
        if next(iter(sft.layers.values())).gradient_observer is not None:
            watched.append(step)
        train(model, sft, optimizer, range(step - 1, step))
    # 1..A, then from R*n to R*n + A (the reference opens a window after step R*n - 1); none closing after T
    assert watched == [1, 2, 5, 6, 7, 10, 11, 12]


@pytest.mark.parametrize("regrowth", ["accumulated_gradients", "sm3"])
def test_the_first_reselection_replaces_at_least_90_percent_of_the_random_start(regrowth):
    model = tiny_llama()
    sft = sparse(regrowth, density=0.02).apply(model)
    initial = {name: active(layer) for name, layer in sft.layers.items()}
    optimizer = (SM3 if regrowth == "sm3" else SFTAdamW)(model.parameters(), lr=1e-2)
    train(model, sft, optimizer, range(2))
    kept = sum(len(initial[name] & active(layer)) for name, layer in sft.layers.items())
    assert kept <= 0.1 * sft.budget


# -- weight decay and precision ----------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_a_zero_gradient_with_weight_decay_leaves_every_weight_bit_identical(rule):
    model = tiny_llama()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    sft = sparse(REGROWTH_OF.get(rule, "accumulated_gradients")).apply(model)
    optimizer = RULES[rule](model.parameters())
    for group in optimizer.param_groups:
        group["weight_decay"] = 1.0
    updater = FusedUpdater(model, optimizer)
    for batch in BATCHES[:10]:  # reselections after steps 2 and 6 too
        updater.backward(model(**batch).logits.sum() * 0.0)
        sft.step(optimizer)
    for name, p in model.named_parameters():
        if not name.endswith(".values"):
            assert torch.equal(p, start[name]), name
    for name, weight in effective_weights(sft).items():
        assert torch.equal(weight, start[f"{name}.weight"]), "weight decay pulls toward the base, not toward 0"


def test_a_bf16_base_learns_every_active_entry_and_the_exported_delta_reproduces_its_logits(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    sft = sparse(reselection_steps=8, selection_accumulation_steps=3, total_steps=20).apply(model)
    optimizer = SFTAdamW(model.parameters(), lr=1e-5)
    train(model, sft, optimizer, range(20))  # the last reselection, after step 19, leaves one update to its entries
    for name, layer in sft.layers.items():
        assert layer.weight.dtype == torch.bfloat16 and layer.values.dtype == torch.float32
        assert (layer.values != 0).all(), f"{name}: {int((layer.values == 0).sum())} of {layer.values.numel()} never moved"
    path = tmp_path / "delta.safetensors"
    sft.export_delta(path)
    base = tiny_llama(dtype=torch.bfloat16)
    apply_sparse_delta(base, path)
    tokens = BATCHES[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(base(input_ids=tokens).logits, model(input_ids=tokens).logits)
    report = delta_size_report(base, path)
    assert report["delta_bytes"] < 8 * sft.budget + 4096, "an int32 index and an fp32 value per entry, and a header"


# -- regrowth as the reference does it ---------------------------------------------------------


def test_sm3_regrowth_grows_the_largest_outer_products_of_accumulators_fed_by_the_active_entries():
    R, A, T, lr, eps = 4, 1, 12, 1e-2, 1e-8  # reselections after step 1 (every entry) and step 5
    model = tiny_llama()
    sft = SparseFineTuning(density=0.05, regrowth="sm3", reselection_steps=R, selection_accumulation_steps=A, total_steps=T).apply(model)
    optimizer = SM3(model.parameters(), lr=lr, eps=eps)
    updater = FusedUpdater(model, optimizer)
    shapes = {name: layer.weight.shape for name, layer in sft.layers.items()}
    rows = {name: torch.zeros(shape[0]) for name, shape in shapes.items()}
    cols = {name: torch.zeros(shape[1]) for name, shape in shapes.items()}
    delta = {name: torch.zeros(shape.numel()) for name, shape in shapes.items()}  # the expected delta, dense
    for step in range(1, 6):
        grads = dense_gradients(model, sft, BATCHES[step])
        before = {name: layer.indices.long().clone() for name, layer in sft.layers.items()}
        for name, indices in before.items():  # SM3 on the active entries (SftSM3): accumulators of the whole matrix
            r, c = indices // shapes[name][1], indices % shapes[name][1]
            g = grads[name][indices]
            nu = torch.minimum(rows[name][r], cols[name][c]) + g * g
            rows[name].scatter_reduce_(0, r, nu, "amax")
            cols[name].scatter_reduce_(0, c, nu, "amax")
            delta[name][indices] -= lr * g / (nu + eps).sqrt()
        updater.backward(model(**BATCHES[step]).loss)
        replaced, expected_replaced = sft.step(optimizer), 0
        for name, layer in sft.layers.items():
            state = optimizer.state[layer.values]
            torch.testing.assert_close(state["accumulator_0"].view(-1), rows[name], rtol=1e-4, atol=0)
            torch.testing.assert_close(state["accumulator_1"].view(-1), cols[name], rtol=1e-4, atol=0)
            now = layer.indices.long()
            grown = now[~torch.isin(now, before[name])]
            pruned = before[name][~torch.isin(before[name], now)]
            if step in (1, 5):
                count = int(before[name].numel() * (1.0 if step == 1 else 0.2 * (1 - step / T)))
                scores = torch.outer(rows[name], cols[name]).view(-1)
                scores[before[name]] = -1.0  # every entry active before the reselection is out of the running
                assert grown.numel() == pruned.numel() == count, name
                assert set(grown.tolist()) == set(scores.topk(count).indices.tolist()), name
                kept = before[name][torch.isin(before[name], now)]
                if kept.numel():  # the smallest |delta| went
                    assert delta[name][pruned].abs().max() <= delta[name][kept].abs().min(), name
                delta[name][pruned] = 0.0  # back to the base; the regrown entries start at 0 too
                expected_replaced += count
            else:
                assert grown.numel() == 0
            torch.testing.assert_close(layer.values, delta[name][now], rtol=1e-4, atol=1e-7)
        assert replaced == expected_replaced


def test_accumulated_gradient_regrowth_seeds_moments_for_a_bias_correction_by_each_entry_age():
    A, lr, (beta1, beta2), eps = 3, 1e-3, (0.9, 0.999), 1e-8
    model = tiny_llama()
    sft = sparse(reselection_steps=8, selection_accumulation_steps=A, total_steps=16).apply(model)
    optimizer = SFTAdamW(model.parameters(), lr=lr, betas=(beta1, beta2), eps=eps)
    updater = FusedUpdater(model, optimizer)
    initial = {name: layer.indices.long().clone() for name, layer in sft.layers.items()}
    window: dict[str, list[torch.Tensor]] = {name: [] for name in sft.layers}
    for step in range(1, A + 1):  # the first window; the reselection after step A prunes every entry
        for name, grad in dense_gradients(model, sft, BATCHES[step]).items():
            window[name].append(grad)
        updater.backward(model(**BATCHES[step]).loss)
        sft.step(optimizer)
    after = dense_gradients(model, sft, BATCHES[A + 1])
    regrown = {}
    for name, layer in sft.layers.items():
        grads = torch.stack(window[name])
        candidates = grads[0].abs().topk(layer.values.numel()).indices  # top |grad| over ALL entries, at the window start
        assert active(layer) == set(candidates.tolist()), "with every entry pruned, every candidate is active"
        now = layer.indices.long()
        grown = ~torch.isin(now, initial[name])
        assert grown.any() and (layer.values[grown] == 0).all()
        assert (~grown).any(), "an active entry among the candidates survives the full pruning"
        regrown[name] = (now[grown], grown)
    updater.backward(model(**BATCHES[A + 1]).loss)
    for name, layer in sft.layers.items():
        indices, grown = regrown[name]
        grads = torch.stack(window[name])[:, indices]
        # seeded with the window's means, biased for A steps; one more step; bias-corrected by the age A
        m = beta1 * grads.mean(0) * (1 - beta1**A) + (1 - beta1) * after[name][indices]
        v = beta2 * grads.square().mean(0) * (1 - beta2**A) + (1 - beta2) * after[name][indices].square()
        expected = -lr * (m / (1 - beta1**A)) / ((v.sqrt() + eps) / math.sqrt(1 - beta2**A))
        torch.testing.assert_close(layer.values[grown], expected, rtol=1e-4, atol=1e-9, msg=name)
        assert (optimizer.state[layer.values]["age"][grown] == A + 1).all()


def reference_sft_adamw_step(p, grad, state, lr, weight_decay, betas=(0.9, 0.999), eps=1e-6):
    """SpIEL's ``SftAdamW.step`` for one tensor, transcribed from AlanAnsell/peft ``src/peft/tuners/sft/optimizer.py``
    (its defaults: betas (0.9, 0.999), eps 1e-6; the paper's ``finetune/finetune.py`` in ducdauge/sft-llm passes
    only ``lr`` and the group's ``weight_decay``, 1 to 30 in its ``hp_search.sh``)."""
    age, exp_avg, exp_avg_sq = state["age"], state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    denom.mul_(1.0 - beta1**age)
    denom.div_(torch.sqrt(1.0 - beta2**age))
    p.addcdiv_(exp_avg, denom, value=-lr)
    if weight_decay > 0.0:
        p.add_(p, alpha=-lr * weight_decay)
    age += 1


def test_sft_adamw_with_its_defaults_steps_as_the_reference_does_with_the_papers_weight_decay():
    lr, weight_decay = 1e-5, 30.0  # the paper's largest decay, at its SFT-AG learning rate
    generator = torch.Generator().manual_seed(0)
    values = nn.Parameter(torch.randn(64, generator=generator) * 1e-3)
    expected = values.detach().clone()
    optimizer = SFTAdamW([values], lr=lr, weight_decay=weight_decay)  # as the paper builds it: eps etc. left default
    ages = torch.randint(1, 6, (64,), generator=generator).float()  # regrown entries start older than 1
    reference = {"age": ages, "exp_avg": torch.zeros(64), "exp_avg_sq": torch.zeros(64)}
    optimizer.state[values].update({key: value.clone() for key, value in reference.items()})
    for _ in range(6):
        grad = torch.randn(64, generator=generator) * 1e-6  # small: eps 1e-6 and 1e-8 give different steps here
        values.grad = grad.clone()
        optimizer.step()
        reference_sft_adamw_step(expected, grad, reference, lr, weight_decay)
        torch.testing.assert_close(values.detach(), expected, rtol=1e-6, atol=0)
    assert torch.equal(optimizer.state[values]["age"], reference["age"])


def test_kept_entries_keep_their_optimizer_state_and_regrown_ones_start_from_zero():
    model = tiny_llama()
    sft = sparse().apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # no per-entry age: regrown moments start at 0
    train(model, sft, optimizer, range(5))
    updater = FusedUpdater(model, optimizer)
    updater.backward(model(**BATCHES[5]).loss)  # step 6, then the reselection after it
    moments = {name: dict(zip(layer.indices.tolist(), optimizer.state[layer.values]["exp_avg"].tolist())) for name, layer in sft.layers.items()}
    assert sft.step(optimizer) > 0
    for name, layer in sft.layers.items():
        exp_avg = optimizer.state[layer.values]["exp_avg"]
        for index, value in zip(layer.indices.tolist(), exp_avg.tolist()):
            assert value == moments[name].get(index, 0.0), (name, index)
        grown = [i for i, index in enumerate(layer.indices.tolist()) if index not in moments[name]]
        assert grown and (layer.values[grown] == 0).all()


# -- the quantized base (qSpIEL) ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_quantized_base_learns_and_its_delta_merges_into_the_full_precision_base(scheme, tmp_path):
    pytest.importorskip("torchao")
    from lomo_lightning.selection.sft.quantize import is_quantized

    model, full = tiny_llama(), tiny_llama()
    sft = sparse(quantize_base=scheme, density=0.1).apply(model)
    assert all(is_quantized(layer.weight) for layer in sft.layers.values())
    batch = BATCHES[0]
    with torch.no_grad():
        start = model(**batch).loss.item()
        quantization_gap = (model(**batch).logits - full(**batch).logits).abs().max().item()
    optimizer = SFTAdamW(model.parameters(), lr=1e-2)
    updater = FusedUpdater(model, optimizer)
    for _ in range(12):  # the same batch: the loss must fall
        updater.backward(model(**batch).loss)
        sft.step(optimizer)
    path = tmp_path / "delta.safetensors"
    sft.export_delta(path)
    apply_sparse_delta(full, path)
    with torch.no_grad():
        assert model(**batch).loss.item() < start - 0.25
        difference = (full(**batch).logits - model(**batch).logits).abs().max().item()
    assert 0 < quantization_gap and difference <= 2 * quantization_gap, "full-precision base + delta = trained model, to dequantization"


# -- engines, checkpoints, export --------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_fused_training_with_reselection_equals_unfused(rule):
    regrowth = REGROWTH_OF.get(rule, "accumulated_gradients")
    models = [tiny_llama(), tiny_llama()]
    sfts = [sparse(regrowth).apply(model) for model in models]
    optimizers = [RULES[rule](model.parameters()) for model in models]
    train(models[0], sfts[0], optimizers[0], range(7), fused=False)
    train(models[1], sfts[1], optimizers[1], range(7))
    for (name, expected), actual in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)
    assert any(layer.values.abs().max() > 1e-4 for layer in sfts[1].layers.values()), "training must move the values"


def test_fused_norm_clipping_measures_each_active_gradient_once():
    models = [tiny_llama(), tiny_llama()]
    sfts = [sparse().apply(model) for model in models]
    optimizers = [SFTAdamW(model.parameters(), lr=1e-2) for model in models]
    train(models[0], sfts[0], optimizers[0], range(5), fused=False, clip_grad_norm=1e-3)
    train(models[1], sfts[1], optimizers[1], range(5), clip_grad_norm=1e-3)  # two backward passes a step
    for (name, expected), actual in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)
    for name, window in sfts[1].windows.items():  # steps 4 and 5 of the window, each once, not once per pass
        assert window.samples == sfts[0].windows[name].samples == 2


def test_resuming_from_state_dicts_mid_window_continues_bit_identically():
    model = tiny_llama()
    sft = sparse(reselection_steps=5, selection_accumulation_steps=2).apply(model)
    optimizer = SFTAdamW(model.parameters(), lr=1e-2)
    train(model, sft, optimizer, range(6))  # inside the window of steps 5..7
    assert sft.windows and next(iter(sft.windows.values())).samples == 2
    saved = {"model": model.state_dict(), "sft": sft.state_dict(), "optimizer": optimizer.state_dict()}
    saved = torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, saved)

    resumed_model = tiny_llama(seed=123)
    resumed = sparse(reselection_steps=5, selection_accumulation_steps=2, seed=123).apply(resumed_model)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["sft"])
    resumed_optimizer = SFTAdamW(resumed_model.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    train(model, sft, optimizer, range(6, 14))
    train(resumed_model, resumed, resumed_optimizer, range(6, 14))
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(actual, expected), name


class SparseLM(pl.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return SFTAdamW(self.model.parameters(), lr=self.lr)


def lightning_fit(tmp_path, epochs: int, strategy="auto", ckpt_path=None, seed: int = 0, total_steps: int | None = 10) -> tuple[nn.Module, SparseFineTuning, pl.Trainer]:
    """``epochs`` epochs of 5 steps, a checkpoint after each."""
    model = tiny_llama(seed=seed)
    sft = SparseFineTuning(density=0.05, reselection_steps=4, selection_accumulation_steps=2, seed=seed, total_steps=total_steps).apply(model)
    trainer = pl.Trainer(
        max_epochs=epochs,
        strategy=strategy,
        accelerator="cpu",
        callbacks=[SFTReselectionCallback(sft), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(SparseLM(model), DataLoader(BATCHES[:5], batch_size=None), ckpt_path=ckpt_path)
    return model, sft, trainer


def test_a_lightning_run_sets_the_schedule_and_resumes_mid_window_bit_identically(tmp_path):
    model, sft, _ = lightning_fit(tmp_path / "a", epochs=2, strategy=LomoStrategy(), total_steps=None)
    assert sft.config.total_steps == 10 and sft.completed_steps == 10, "the schedule's length is the run's"
    lightning_fit(tmp_path / "b", epochs=1, strategy=LomoStrategy())  # 5 steps: the window of steps 4..6 is open
    resumed, resumed_sft, _ = lightning_fit(
        tmp_path / "c", epochs=2, strategy=LomoStrategy(), ckpt_path=tmp_path / "b" / "last.ckpt", seed=123
    )
    assert resumed_sft.completed_steps == 10
    for (name, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), name
    unfused, _, _ = lightning_fit(tmp_path / "d", epochs=2)  # automatic optimization, no fused engine
    for (name, expected), actual in zip(model.state_dict().items(), unfused.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


def test_the_consolidated_export_is_a_plain_model_with_the_deltas_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    sft = sparse().apply(model)
    train(model, sft, SFTAdamW(model.parameters(), lr=1e-2), range(5))
    save_pretrained_consolidated(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert not any(isinstance(m, SparseDeltaLinear) for m in reloaded.modules())
    tokens = BATCHES[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


# -- SM3 ---------------------------------------------------------------------------------------


def test_sm3_on_all_entries_of_a_matrix_equals_sm3_on_the_matrix_and_bounds_the_squared_gradients():
    torch.manual_seed(0)
    matrix = nn.Parameter(torch.randn(6, 5))
    entries = nn.Parameter(matrix.detach().reshape(-1).clone())
    entries.matrix_entries = lambda: (torch.arange(30), (6, 5))
    optimizers = [SM3([p], lr=0.1, momentum=0.5, weight_decay=0.1) for p in (matrix, entries)]
    squares = torch.zeros(6, 5)
    for _ in range(4):
        grad = torch.randn(6, 5) * torch.rand(6, 1)
        squares += grad.square()
        matrix.grad, entries.grad = grad.clone(), grad.reshape(-1).clone()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(entries.detach(), matrix.detach().reshape(-1), rtol=1e-6, atol=0)
    for key in ("accumulator_0", "accumulator_1"):
        torch.testing.assert_close(optimizers[1].state[entries][key], optimizers[0].state[matrix][key], rtol=0, atol=0)
    state = optimizers[0].state[matrix]
    # SM3's guarantee (Anil et al., 2019): min(row_i, col_j) >= sum over steps of g_ij^2
    assert (torch.minimum(state["accumulator_0"], state["accumulator_1"]) >= squares * (1 - 1e-6)).all()


# -- errors ------------------------------------------------------------------------------------


def test_bad_settings_fail_with_one_clear_line():
    for options, match in [
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(num_tunable_weights=0), "num_tunable_weights"),
        (dict(regrowth="magnitude"), "regrowth"),
        (dict(prune_schedule="step"), "prune_schedule"),
        (dict(reselection_steps=4, selection_accumulation_steps=3), "selection_accumulation_steps"),
        (dict(quantize_base="int3"), "quantize_base"),
    ]:
        with pytest.raises(ValueError, match=match):
            SFTConfig(**options)
    with pytest.raises(ValueError, match="budget"):
        SparseFineTuning(num_tunable_weights=10**9).apply(tiny_llama())
    with pytest.raises(ValueError, match="nn.Linear"):
        SparseFineTuning(targets=["norm"]).apply(tiny_llama())
    model = tiny_llama()
    sft = sparse("sm3").apply(model)
    with pytest.raises(ValueError, match="once"):
        sparse().apply(model)
    with pytest.raises(TypeError, match="SM3"):
        sft.step(SFTAdamW(model.parameters()))
    with pytest.raises(ValueError, match="total_steps"):
        SparseFineTuning(density=0.05, selection_accumulation_steps=1, reselection_steps=3).apply(tiny_llama()).step(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0))
