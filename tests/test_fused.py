"""FusedUpdater: N fused steps give the same parameters as N ordinary ``backward(); step()`` iterations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches, tiny_llama

from lomo_lightning import AdaLomo, DynamicLossScaler, FusedUpdater, Lomo

RULES = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2),
    "lomo": lambda params: Lomo(params, lr=0.05, weight_decay=0.01),
    "adalomo": lambda params: AdaLomo(params, lr=1e-2, weight_decay=0.1),
}


def train_unfused(model, optimizer, data, clip_grad_norm=None):
    for batch in data:
        model(**batch).loss.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def train_fused(model, optimizer, data, **kwargs):
    updater = FusedUpdater(model, optimizer, **kwargs)
    for batch in data:
        assert updater.backward(model(**batch).loss)
    return updater


def max_param_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rule", list(RULES))
def test_fused_equals_unfused(rule, tie):
    reference = tiny_llama(tie=tie)
    fused = copy.deepcopy(reference)
    start = copy.deepcopy(reference)
    data = batches(5)

    train_unfused(reference, RULES[rule](reference.parameters()), data)
    train_fused(fused, RULES[rule](fused.parameters()), data)

    assert max_param_diff(reference, start) > 1e-3, "training must move the parameters"
    assert max_param_diff(fused, reference) < 1e-6
    assert all(p.grad is None for p in fused.parameters()), "fused training must leave no gradient behind"


def test_tied_embedding_is_updated_once_with_its_full_gradient():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    calls = []
    optimizer = Lomo(model.parameters(), lr=0.1)
    updater = FusedUpdater(model, optimizer)
    original = optimizer.step_parameter
    optimizer.step_parameter = lambda p, g, group, **kw: (calls.append(p), original(p, g, group, **kw))
    updater.backward(model(**batches(1)[0]).loss)
    embedding = model.model.embed_tokens.weight
    assert sum(p is embedding for p in calls) == 1
    assert len(calls) == len(list(model.parameters()))


def test_two_pass_clipping_equals_clip_grad_norm_then_step():
    reference = tiny_llama()
    fused = copy.deepcopy(reference)
    data = batches(3)
    train_unfused(reference, AdaLomo(reference.parameters(), lr=1e-2), data, clip_grad_norm=0.05)
    updater = train_fused(fused, AdaLomo(fused.parameters(), lr=1e-2), data, clip_grad_norm=0.05)
    assert updater.last_grad_norm > 0.05, "the test must exercise clipping"
    assert max_param_diff(fused, reference) < 1e-6


def test_value_clipping_equals_clip_grad_value_then_step():
    reference = tiny_llama()
    fused = copy.deepcopy(reference)
    data = batches(3)
    optimizer = Lomo(reference.parameters(), lr=0.1)
    for batch in data:
        reference(**batch).loss.backward()
        torch.nn.utils.clip_grad_value_(reference.parameters(), 1e-3)
        optimizer.step()
        optimizer.zero_grad()
    train_fused(fused, Lomo(fused.parameters(), lr=0.1), data, clip_grad_value=1e-3)
    assert max_param_diff(fused, reference) < 1e-6


def test_lr_scheduler_changes_reach_the_hook():
    model = tiny_llama()
    optimizer = Lomo(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step == 0 else 0.0)
    updater = FusedUpdater(model, optimizer)
    data = batches(2)
    updater.backward(model(**data[0]).loss)
    scheduler.step()
    after_first = copy.deepcopy(model.state_dict())
    updater.backward(model(**data[1]).loss)
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in after_first.items()), "lr=0 must change nothing"


def test_nan_loss_step_is_skipped_and_leaves_parameters_bit_identical():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    optimizer = AdaLomo(model.parameters(), lr=1e-2)
    updater = FusedUpdater(model, optimizer)
    assert not updater.backward(model(**batches(1)[0]).loss * float("nan"))
    assert updater.skipped_steps == 1 and updater.steps == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not optimizer.state, "a skipped step creates no optimizer state"


def test_fp16_overflow_step_leaves_parameters_bit_identical_and_backs_off():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    before = copy.deepcopy(model.state_dict())
    scaler = DynamicLossScaler(scale=2.0**16, growth_interval=1)
    updater = FusedUpdater(model, Lomo(model.parameters(), lr=0.1), loss_scaler=scaler)
    x = torch.randn(4, 8)

    assert not updater.backward(model(x).sum() * 1e36)  # finite loss whose scaled gradients overflow
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert scaler.scale == 2.0**15 and updater.skipped_steps == 1

    reference = copy.deepcopy(model)
    assert updater.backward(model(x).sum())
    reference(x).sum().backward()
    Lomo(reference.parameters(), lr=0.1).step()
    assert max_param_diff(model, reference) < 1e-6, "a clean scaled step equals the unscaled step"
    assert scaler.scale == 2.0**16, "the scale grows back after growth_interval clean steps"


def test_frozen_parameters_get_no_hook_no_state_and_stay_bit_identical():
    model = tiny_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    optimizer = AdaLomo([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    updater = FusedUpdater(model, optimizer)
    for batch in batches(3):
        updater.backward(model(**batch).loss)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert len(updater.parameters) == len(params) - len(frozen)
    assert len(optimizer.state) == len(params) - len(frozen)


def test_trainable_parameter_missing_from_optimizer_is_a_clear_error():
    model = tiny_llama()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="require grad but are not in the optimizer"):
        FusedUpdater(model, Lomo(params[1:], lr=0.1))


def test_remove_restores_an_ordinary_model():
    model = tiny_llama()
    updater = FusedUpdater(model, Lomo(model.parameters(), lr=0.1))
    updater.remove()
    model(**batches(1)[0]).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


class ScaledSGD(torch.optim.Optimizer):
    """A third-party rule that is no PerParameterOptimizer but meets the FusableRule protocol."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.stepped_alone: list[torch.Tensor] = []

    def step_parameter(self, param, grad, group, *, grad_is_scratch=False):
        self.stepped_alone.append(param)
        param.add_(grad, alpha=-group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"])


def test_a_rule_meeting_the_protocol_steps_each_parameter_itself():
    from lomo_lightning.optim.base import FusableRule, SplitStepRule

    model, reference = tiny_llama(), tiny_llama()
    optimizer = ScaledSGD(model.parameters(), lr=0.1)
    assert isinstance(optimizer, FusableRule) and not isinstance(optimizer, SplitStepRule)
    assert isinstance(AdaLomo(reference.parameters()), SplitStepRule)
    updater = FusedUpdater(model, optimizer)
    expected = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in batches(2):
        updater.backward(model(**batch).loss)
        reference(**batch).loss.backward()
        expected.step()
        expected.zero_grad(set_to_none=True)
    assert len(optimizer.stepped_alone) == 2 * len(updater.parameters), "the engine must call step_parameter"
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
