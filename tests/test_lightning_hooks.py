"""Fused strategies and Lightning's hooks: each hook runs where Lightning documents it, or fit refuses it with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, tiny_llama
from lightning.pytorch import Callback
from test_strategy import TinyFusedLM, TinyLM, loader, trainer


class CountsBackwardHooks(TinyLM):
    def __init__(self, model):
        super().__init__(model)
        self.calls: list[str] = []

    def on_before_backward(self, loss):
        self.calls.append("before")

    def on_after_backward(self):
        # the fused backward has updated every parameter and freed its gradient
        assert all(p.grad is None for p in self.parameters())
        self.calls.append("after")


def test_before_and_after_backward_hooks_run_once_per_step_around_the_fused_backward():
    module = CountsBackwardHooks(tiny_llama())
    trainer(max_steps=3).fit(module, loader(batches(3)))
    assert module.calls == ["before", "after"] * 3


class OverridesBackward(TinyLM):
    def backward(self, loss, *args, **kwargs):
        loss.backward()


class OverridesBeforeOptimizerStep(TinyLM):
    def on_before_optimizer_step(self, optimizer):
        pass


class OverridesClipping(TinyLM):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        pass


@pytest.mark.parametrize(
    ("module_cls", "message"),
    [
        (OverridesBackward, r"OverridesBackward\.backward cannot run under fused updates: the fused strategy runs backward itself"),
        (OverridesBeforeOptimizerStep, r"on_before_optimizer_step cannot run under fused updates: there is no moment with gradients"),
        (OverridesClipping, r"configure_gradient_clipping cannot run under fused updates: the engine clips.*gradient_clip_val"),
    ],
    ids=["backward", "on_before_optimizer_step", "configure_gradient_clipping"],
)
def test_a_module_hook_that_needs_gradients_before_a_step_is_refused_with_the_reason(module_cls, message):
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        trainer(max_steps=1).fit(module_cls(model), loader(batches(1)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "refused before any update"


class LogsGradNorm(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass


def test_a_callback_overriding_on_before_optimizer_step_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="callback LogsGradNorm overrides on_before_optimizer_step"):
        trainer(max_steps=1, callbacks=[LogsGradNorm()]).fit(TinyLM(tiny_llama()), loader(batches(1)))


class BacksTwice(TinyFusedLM):
    """Manual optimization: a second backward through the same graph needs ``retain_graph=True`` in the first.

    The second one asks for the gradient of the loss by the logits: the fused pass has changed the
    weights in place, so only the part of the graph after them can be walked again.
    """

    def __init__(self, model, **backward_kwargs):
        super().__init__(model)
        self.backward_kwargs = backward_kwargs
        self.second_grad: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        self.manual_backward(loss, **self.backward_kwargs)
        (self.second_grad,) = torch.autograd.grad(loss, logits)  # through the retained graph
        self.optimizers().step()  # counts the step
        return loss.detach()


def test_manual_backward_keeps_the_graph_with_retain_graph():
    module = BacksTwice(tiny_llama(), retain_graph=True)
    trainer(max_steps=1).fit(module, loader(batches(1)))
    assert module.second_grad is not None and torch.isfinite(module.second_grad).all()


def test_manual_backward_without_retain_graph_frees_the_graph():
    with pytest.raises(RuntimeError, match="second time"):
        trainer(max_steps=1).fit(BacksTwice(tiny_llama()), loader(batches(1)))


def test_manual_backward_refuses_arguments_it_would_otherwise_drop():
    with pytest.raises(TypeError, match="retain_graph only, got create_graph"):
        trainer(max_steps=1).fit(BacksTwice(tiny_llama(), create_graph=True), loader(batches(1)))
