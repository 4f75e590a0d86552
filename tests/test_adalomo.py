"""AdaLomo equals the reference implementation (``lomo_optim.AdaLomo``) step for step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches, tiny_llama

from lomo_lightning import AdaLomo, FusedUpdater


@pytest.fixture
def reference_adalomo(monkeypatch):
    """The reference class, with its hard-coded ``.cuda()`` mapped to a no-op so it runs on CPU."""
    lomo_optim = pytest.importorskip("lomo_optim")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    return lomo_optim.AdaLomo


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_adalomo_matches_reference_for_five_steps(reference_adalomo, fused, weight_decay):
    reference = tiny_llama()  # untied: the reference updates through pre-accumulation hooks
    ours = copy.deepcopy(reference)
    start = copy.deepcopy(reference)
    lr = 1e-2
    reference_optimizer = reference_adalomo(reference, lr=lr, loss_scale=None, weight_decay=weight_decay)
    optimizer = AdaLomo(ours.parameters(), lr=lr, weight_decay=weight_decay)
    updater = FusedUpdater(ours, optimizer) if fused else None

    for batch in batches(5):
        reference_optimizer.fused_backward(reference(**batch).loss, lr)
        loss = ours(**batch).loss
        if fused:
            updater.backward(loss)
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    one_dim = [n for n, p in ours.named_parameters() if p.dim() == 1]
    assert one_dim, "the model must exercise the 1-D (unfactored) branch"
    moved = max((p - q).abs().max().item() for p, q in zip(reference.parameters(), start.parameters()))
    assert moved > 1e-3
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_state_is_fp32_and_factored():
    model = tiny_llama(dtype=torch.bfloat16)
    optimizer = AdaLomo(model.parameters(), lr=1e-3)
    FusedUpdater(model, optimizer).backward(model(**batches(1)[0]).loss)
    for param in model.parameters():
        state = optimizer.state[param]
        tensors = [v for k, v in state.items() if k != "step"]
        assert all(t.dtype == torch.float32 for t in tensors)
        assert sum(t.numel() for t in tensors) == (sum(param.shape) if param.dim() == 2 else param.numel())


def test_state_dict_round_trip_continues_identically():
    model = tiny_llama()
    data = batches(4)
    optimizer = AdaLomo(model.parameters(), lr=1e-2)
    updater = FusedUpdater(model, optimizer)
    for batch in data[:2]:
        updater.backward(model(**batch).loss)
    resumed_model = copy.deepcopy(model)
    resumed_optimizer = AdaLomo(resumed_model.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    resumed = FusedUpdater(resumed_model, resumed_optimizer)
    for batch in data[2:]:
        updater.backward(model(**batch).loss)
        resumed.backward(resumed_model(**batch).loss)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"lr": -1.0}, "lr"), ({"decay_rate": 0.5}, "decay_rate"), ({"clip_threshold": 0.0}, "clip_threshold")],
)
def test_bad_hyperparameters_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLomo([torch.nn.Parameter(torch.zeros(2))], **kwargs)
