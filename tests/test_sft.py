"""Sparse fine-tuning (SpIEL): a fixed budget of active entries, the rest of the model untouched."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch import nn

from lomo_lightning.callbacks import SFTReselectionCallback
from lomo_lightning.selection.base import gradient_routes
from lomo_lightning.selection.sft import SparseFineTuning, apply_sparse_delta, delta_size_report

REGROWTH_RULES = ["sm3", "accumulated_gradients"]
TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def sparse(regrowth: str, **overrides) -> SparseFineTuning:
    arguments = dict(
        density=0.05, regrowth=regrowth, reselection_steps=3, selection_accumulation_steps=2, total_steps=12
    )
    return SparseFineTuning(**(arguments | overrides))


def unfused_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad_norm: float | None = None) -> None:
    """What the fused engine does, in plain torch: route the gradients, (clip,) step, write the values back."""
    routes = gradient_routes(model).values()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    for route in routes:
        route.target.grad = route.gather(route.source.grad)
        route.source.grad = None
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([route.target for route in routes], clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    for route in routes:
        route.scatter()


def active_sets(sft: SparseFineTuning) -> dict[str, set[int]]:
    return {route.name: set(route.indices.tolist()) for route in sft.routes}


@pytest.mark.parametrize("regrowth", REGROWTH_RULES)
def test_budget_is_kept_and_the_active_set_changes_at_every_reselection(regrowth):
    model = tiny_llama()
    sft = sparse(regrowth).apply(model)
    targets = sum(route.source.numel() for route in sft.routes)
    assert sft.budget == round(0.05 * targets)
    per_weight = {route.name: route.indices.numel() for route in sft.routes}
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for step in range(1, 10):
        before = active_sets(sft)
        unfused_step(model, optimizer)
        sft.step(optimizer)
        after = active_sets(sft)
        assert {route.name: route.indices.numel() for route in sft.routes} == per_weight
        assert all(len(indices) == per_weight[name] for name, indices in after.items())  # no duplicates
        if step % 3 == 0:
            assert after != before
        else:
            assert after == before


@pytest.mark.parametrize("regrowth", REGROWTH_RULES)
def test_only_active_entries_ever_change(regrowth):
    model = tiny_llama()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    sft = sparse(regrowth).apply(model)
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for _ in range(8):
        unfused_step(model, optimizer)
        sft.step(optimizer)
    routes = {route.name: route for route in sft.routes}
    for name, parameter in model.named_parameters():
        if name not in routes:
            assert torch.equal(parameter, start[name]), name
            continue
        inactive = torch.ones(parameter.numel(), dtype=torch.bool)
        inactive[routes[name].indices] = False
        assert torch.equal(parameter.view(-1)[inactive], start[name].view(-1)[inactive]), name
        assert not torch.equal(parameter, start[name]), name


@pytest.mark.parametrize("regrowth", REGROWTH_RULES)
def test_pruned_entries_are_reset_to_the_base_weights(regrowth):
    model = tiny_llama()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    sft = sparse(regrowth).apply(model)
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for _ in range(2):
        unfused_step(model, optimizer)
        sft.step(optimizer)
    unfused_step(model, optimizer)
    before = {route.name: route.indices.clone() for route in sft.routes}
    moved = {route.name: route.source.detach().view(-1)[route.indices].clone() for route in sft.routes}
    sft.step(optimizer)  # the third step: reselection
    pruned_any = False
    for route in sft.routes:
        pruned = ~torch.isin(before[route.name], route.indices)
        pruned_any |= bool(pruned.any())
        pruned_indices = before[route.name][pruned]
        weight, base = route.source.detach().view(-1), start[route.name].view(-1)
        assert torch.equal(weight[pruned_indices], base[pruned_indices])
        assert not torch.equal(moved[route.name][pruned], base[pruned_indices])  # they had moved
    assert pruned_any


def test_optimizer_state_follows_the_values_and_new_entries_start_from_zero_with_sm3():
    model = tiny_llama()
    sft = sparse("sm3").apply(model)
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for _ in range(3):
        unfused_step(model, optimizer)
        if sft.completed_steps == 2:
            before = {
                route.name: dict(zip(route.indices.tolist(), optimizer.state[route.values]["exp_avg"].tolist()))
                for route in sft.routes
            }
        sft.step(optimizer)
    for route in sft.routes:
        exp_avg = optimizer.state[route.values]["exp_avg"]
        for index, moment in zip(route.indices.tolist(), exp_avg.tolist()):
            assert moment == before[route.name].get(index, 0.0)


def test_accumulated_gradient_regrowth_seeds_moments_with_the_window_statistics():
    model = tiny_llama()
    sft = sparse("accumulated_gradients").apply(model)
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    window_gradients: dict[str, list[torch.Tensor]] = {route.name: [] for route in sft.routes}
    for step in range(1, 4):
        before = active_sets(sft)
        if step >= 2:  # the last selection_accumulation_steps=2 steps before the reselection at step 3
            gradients = dense_gradients(model)
            for route in sft.routes:
                window_gradients[route.name].append(gradients[route.name].view(-1))
        unfused_step(model, optimizer)
        sft.step(optimizer)
    for route in sft.routes:
        grads = torch.stack(window_gradients[route.name])
        state = optimizer.state[route.values]
        grown = torch.tensor([i not in before[route.name] for i in route.indices.tolist()])
        assert grown.any()
        indices = route.indices[grown]
        torch.testing.assert_close(state["exp_avg"][grown], grads[:, indices].mean(0))
        torch.testing.assert_close(state["exp_avg_sq"][grown], grads[:, indices].square().mean(0))


def dense_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """The dense gradient of every parameter at the current weights (a separate backward on a copy)."""
    copy = tiny_llama()
    copy.load_state_dict(model.state_dict())
    copy(input_ids=TOKENS, labels=TOKENS).loss.backward()
    return {name: p.grad for name, p in copy.named_parameters()}


def test_sm3_score_bounds_the_sum_of_squared_gradients_of_every_entry():
    # SM3's guarantee (Anil et al., 2019): min(row_i, col_j) >= sum over steps of g_ij^2.
    model = tiny_llama()
    sft = sparse("sm3", reselection_steps=100).apply(model)
    optimizer = torch.optim.SGD(sft.parameters(), lr=1e-2)
    route = sft.routes[0]
    squared_sum = torch.zeros_like(route.source).view(route.source.shape[0], -1)
    for _ in range(3):
        squared_sum += dense_gradients(model)[route.name].view_as(squared_sum).square()
        unfused_step(model, optimizer)
        sft.step(optimizer)
    growth = route.growth
    scores = torch.minimum(growth.row[:, None], growth.col[None, :])
    assert (scores >= squared_sum * (1 - 1e-5)).all()


@pytest.mark.parametrize("regrowth", REGROWTH_RULES)
def test_optimizer_state_is_of_the_order_of_the_budget(regrowth):
    model = tiny_llama()
    sft = sparse(regrowth).apply(model)
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for _ in range(4):
        unfused_step(model, optimizer)
        sft.step(optimizer)
    state_numel = sum(t.numel() for state in optimizer.state.values() for t in state.values())
    # exp_avg and exp_avg_sq of size k, plus one scalar step counter per weight
    assert state_numel <= 2 * sft.budget + len(sft.routes)
    assert 2 * sft.budget < sum(route.source.numel() for route in sft.routes)


def test_exported_delta_merged_into_a_fresh_base_model_reproduces_the_trained_model(tmp_path):
    model = tiny_llama(seed=0)
    sft = sparse("sm3").apply(model)
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for _ in range(7):
        unfused_step(model, optimizer)
        sft.step(optimizer)
    path = tmp_path / "delta.safetensors"
    sft.export_delta(path)

    base = tiny_llama(seed=0)
    apply_sparse_delta(base, path)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits, rtol=0, atol=1e-6)

    report = delta_size_report(model, path)
    assert report["delta_bytes"] < 0.2 * report["model_bytes"]
    assert report["fraction"] == report["delta_bytes"] / report["model_bytes"]


def test_default_targets_are_the_linear_weights_inside_the_blocks():
    model = tiny_llama()
    sft = sparse("sm3").apply(model)
    names = {route.name for route in sft.routes}
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert all(name.startswith("model.layers.") and name.endswith("_proj.weight") for name in names)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == names


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="density"):
        SparseFineTuning(density=0.0)
    with pytest.raises(ValueError, match="density"):
        SparseFineTuning(density=1.5)
    with pytest.raises(ValueError, match="regrowth"):
        SparseFineTuning(regrowth="magnitude")
    with pytest.raises(ValueError, match="prune_schedule"):
        SparseFineTuning(prune_schedule="step")
    with pytest.raises(ValueError, match="selection_accumulation_steps"):
        SparseFineTuning(regrowth="accumulated_gradients", reselection_steps=3, selection_accumulation_steps=4)
    SparseFineTuning(regrowth="sm3", reselection_steps=1)  # SM3 has no accumulation window to fit


@pytest.mark.parametrize(("schedule", "at_one_quarter"), [("linear", 0.15), ("cosine", 0.1 * (1 + 0.5**0.5))])
def test_prune_fraction_decays_from_the_initial_fraction_to_zero(schedule, at_one_quarter):
    sft = SparseFineTuning(prune_schedule=schedule, initial_prune_fraction=0.2, total_steps=100)
    assert sft.prune_fraction(0) == pytest.approx(0.2)
    assert sft.prune_fraction(25) == pytest.approx(at_one_quarter)
    assert sft.prune_fraction(50) == pytest.approx(0.1)
    assert sft.prune_fraction(100) == pytest.approx(0.0)


@pytest.mark.parametrize("rule", ["AdamW", "AdaLomo", "Lomo"])
@pytest.mark.parametrize("regrowth", REGROWTH_RULES)
def test_fused_training_with_reselection_equals_unfused(regrowth, rule):
    from lomo_lightning import AdaLomo, Lomo
    from lomo_lightning.fused import FusedUpdater

    optimizer_class = {"AdamW": torch.optim.AdamW, "AdaLomo": AdaLomo, "Lomo": Lomo}[rule]
    models = [tiny_llama(), tiny_llama()]
    sfts = [sparse(regrowth).apply(model) for model in models]
    optimizers = [optimizer_class(sft.parameters(), lr=1e-2) for sft in sfts]
    updater = FusedUpdater(models[1], optimizers[1])
    for _ in range(7):
        unfused_step(models[0], optimizers[0])
        sfts[0].step(optimizers[0])
        updater.backward(models[1](input_ids=TOKENS, labels=TOKENS).loss)
        sfts[1].step(optimizers[1])
    assert active_sets(sfts[0]) == active_sets(sfts[1])
    for (name, expected), actual in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


def test_fused_norm_clipping_measures_the_active_entries_the_rule_sees():
    from lomo_lightning import AdaLomo
    from lomo_lightning.fused import FusedUpdater

    models = [tiny_llama(), tiny_llama()]
    sfts = [sparse("sm3").apply(model) for model in models]
    optimizers = [AdaLomo(sft.parameters(), lr=1e-2) for sft in sfts]
    updater = FusedUpdater(models[1], optimizers[1], clip_grad_norm=1e-3)
    for _ in range(3):
        unfused_step(models[0], optimizers[0], clip_grad_norm=1e-3)
        updater.backward(models[1](input_ids=TOKENS, labels=TOKENS).loss)
    assert updater.last_grad_norm > 1e-3, "the test must exercise clipping"
    for (name, expected), actual in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


class SparseCausalLM(pl.LightningModule):
    """Trains the active values of ``sft``; under a fused strategy the engine follows the routes."""

    def __init__(self, model: nn.Module, sft: SparseFineTuning) -> None:
        super().__init__()
        self.model = model
        self.sft = sft

    def training_step(self, batch, batch_index):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.sft.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, 128, (12, 16)), batch_size=2)


class UnfusedSparseCausalLM(SparseCausalLM):
    def on_after_backward(self):
        # The unfused route: hand each active gradient to the values the optimizer owns.
        for route in self.sft.routes:
            route.values.grad = route.gather(route.source.grad)
            route.source.grad = None

    def optimizer_step(self, epoch, batch_index, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        for route in self.sft.routes:
            route.scatter()


def test_callback_sets_the_schedule_length_and_reselects_during_fit():
    model = tiny_llama()
    sft = SparseFineTuning(density=0.05, reselection_steps=2, selection_accumulation_steps=1).apply(model)
    start = active_sets(sft)
    trainer = pl.Trainer(
        max_steps=5,
        callbacks=[SFTReselectionCallback(sft)],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(UnfusedSparseCausalLM(model, sft))
    assert sft.total_steps == 5
    assert sft.completed_steps == 5
    assert active_sets(sft) != start


@pytest.mark.parametrize("regrowth", REGROWTH_RULES)
def test_resuming_from_a_state_dict_continues_exactly(regrowth):
    model = tiny_llama()
    sft = sparse(regrowth).apply(model)
    optimizer = torch.optim.AdamW(sft.parameters(), lr=1e-2)
    for _ in range(4):  # stop inside an accumulation window (steps 5 and 6 precede the reselection at 6)
        unfused_step(model, optimizer)
        sft.step(optimizer)
    checkpoint = {"model": model.state_dict(), "sft": sft.state_dict(), "optimizer": optimizer.state_dict()}
    checkpoint = {key: _deep_clone(value) for key, value in checkpoint.items()}

    resumed_model = tiny_llama(seed=123)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = sparse(regrowth, seed=123).apply(resumed_model)
    resumed.load_state_dict(checkpoint["sft"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for _ in range(4):
        for m, s, o in ((model, sft, optimizer), (resumed_model, resumed, resumed_optimizer)):
            unfused_step(m, o)
            s.step(o)
    assert active_sets(resumed) == active_sets(sft)
    for (name, expected), actual in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(actual, expected), name


def _deep_clone(value):
    return torch.utils._pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, value)


def test_lomo_strategy_routes_the_fused_update_through_the_active_entries():
    from lomo_lightning.strategies import LomoStrategy

    model = tiny_llama()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    sft = SparseFineTuning(density=0.05, reselection_steps=2, selection_accumulation_steps=1).apply(model)
    budget = sft.budget
    module = SparseCausalLM(model, sft)
    trainer = pl.Trainer(
        max_steps=5,
        strategy=LomoStrategy(),
        callbacks=[SFTReselectionCallback(sft)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert sft.completed_steps == 5 and sft.budget == budget
    routes = {route.name: route for route in sft.routes}
    for name, parameter in model.named_parameters():
        inactive = torch.ones(parameter.numel(), dtype=torch.bool)
        if name in routes:
            inactive[routes[name].indices] = False
            assert not torch.equal(parameter, start[name]), name
        assert torch.equal(parameter.view(-1)[inactive], start[name].view(-1)[inactive]), name


def test_regrowth_ranks_ties_by_index_so_any_number_of_shards_agrees():
    from lomo_lightning.selection.layout import WeightLayout

    scores = torch.tensor([0.5, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 0.0])
    # two above the threshold 1.0, then the tied entries with the lowest indices; returned sorted
    assert WeightLayout(torch.zeros(2, 4)).top_indices(scores, 4).tolist() == [1, 2, 3, 4]
    assert WeightLayout(torch.zeros(2, 4)).top_indices(scores, 0).numel() == 0


def test_routes_follow_a_weight_that_was_replaced_after_apply():
    """``fully_shard`` (and moving to another device) replaces parameters: the routes must follow them."""
    from lomo_lightning import AdaLomo, FusedUpdater

    model = tiny_llama()
    sft = sparse("sm3").apply(model)
    route = sft.routes[0]
    owner = model.get_submodule(route.name.rsplit(".", 1)[0])
    old = owner.weight
    owner.weight = nn.Parameter(old.detach().clone())
    updater = FusedUpdater(model, AdaLomo(sft.parameters(), lr=1e-2))
    assert route.source is owner.weight
    before = owner.weight.detach().clone()
    updater.backward(model(input_ids=TOKENS, labels=TOKENS).loss)
    changed = (owner.weight.detach() != before).reshape(-1).nonzero().squeeze(1)
    assert changed.numel() > 0 and set(changed.tolist()) <= set(route.indices.tolist())
    assert torch.equal(old.detach(), before), "the replaced parameter is no longer written"
