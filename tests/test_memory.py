"""Memory contract (MemTracker, deterministic): fused training never holds all gradients at once.

The model is a deep stack of square layers and the batch is tiny, so gradients, not activations,
decide the peak; the floor is the same forward and backward with each gradient dropped once ready.
"""

from __future__ import annotations

import pytest
import torch

from lomo_lightning import AdaLomo, FusedUpdater

mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")

WIDTH, DEPTH = 256, 8


def peak_bytes(step, *tracked) -> int:
    tracker = mem_tracker.MemTracker()
    tracker.track_external(*tracked)
    with tracker:
        step()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return peak["Total"]


def test_fused_peak_stays_at_the_floor_while_a_standard_step_holds_every_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(DEPTH)])
    params = list(model.parameters())
    layer_bytes = WIDTH * WIDTH * 4
    x = torch.randn(2, WIDTH)

    def loss():
        return model(x).square().mean()

    drops = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
    floor = peak_bytes(lambda: loss().backward(), model)
    for handle in drops:
        handle.remove()

    optimizer = AdaLomo(params, lr=1e-3)
    updater = FusedUpdater(model, optimizer)
    fused = peak_bytes(lambda: updater.backward(loss()), model, optimizer)
    updater.remove()

    sgd = torch.optim.SGD(params, lr=1e-3)

    def standard_step():
        loss().backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    standard = peak_bytes(standard_step, model, sgd)

    assert fused - floor < 3 * layer_bytes, "gradient memory of a fused step must stay below 3x the largest parameter"
    # all gradients at once, less the one the floor itself holds in flight
    assert standard - floor >= (DEPTH - 2) * layer_bytes, "a standard step holds all gradients at once"
