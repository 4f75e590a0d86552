"""A benchmark's method is the app's: ``benchmarks.harness.methods.build`` against ``lomo_lightning.train``'s builders.

For the same ``lomo-train`` overrides, the harness and the app (``checked_method``, ``apply_selection``,
``build_module`` and its ``configure_optimizers``, the strategy of ``conf/strategy``) must give the same optimizer
class and hyper-parameters over the same tensors, the same trainable set, and the same strategy and clipping.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

pytest.importorskip("hydra")


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=adalomo"],
        ["method=lomo"],
        ["method=adamw"],
        ["method=adalomo", "selection=hft", "seed=3"],
        ["selection=sft_sm3", "selection.selector.num_tunable_weights=600"],
        ["method=sm3", "method.optimizer.lr=0.02", "method.gradient_clip_val=0.5"],
    ],
    ids=lambda o: " ".join(o),
)
def test_a_harness_method_is_what_lomo_train_builds(overrides):
    from benchmarks.harness import methods
    from lomo_lightning.preflight import build, checked_method
    from lomo_lightning.train import apply_selection, build_module

    bench = methods.build(tiny_llama(), overrides)

    cfg = methods.compose(*overrides)
    factory, _ = checked_method(cfg.method, 100)
    model = tiny_llama()
    if cfg.selection.selector is not None:
        apply_selection(cfg.selection.selector, model, factory)
    module = build_module(cfg, model, object(), factory, None)  # type: ignore[arg-type]  # any non-preference data
    app = module.configure_optimizers()["optimizer"]

    (rule,) = bench.optimizers
    assert type(rule) is type(app)
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in rule.param_groups]
    assert hyper == [{k: v for k, v in group.items() if k != "params"} for group in app.param_groups]
    names = {id(p): name for name, p in bench.model.named_parameters()}
    app_names = {id(p): name for name, p in model.named_parameters()}
    assert [names[id(p)] for g in rule.param_groups for p in g["params"]] == [app_names[id(p)] for g in app.param_groups for p in g["params"]]
    trainable = {name: p.shape for name, p in bench.model.named_parameters() if p.requires_grad}
    assert trainable == {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    if cfg.selection.selector is not None:  # a selection froze some, and the same ones
        assert 0 < len(trainable) < len(dict(model.named_parameters()))

    if cfg.method.fused:
        strategy = build(cfg.strategy.fused, clip_grad_norm=cfg.method.gradient_clip_val)
        assert bench.strategy == strategy.strategy_name
        assert bench.engine.clip_grad_norm == strategy.clip_grad_norm
    else:
        assert bench.strategy == cfg.strategy.unfused and bench.engine is None

    batch = torch.randint(0, 128, (2, 16))
    before = [p.detach().clone() for p in bench.model.parameters()]
    bench.step(batch)  # and the method trains
    assert any(not torch.equal(a, p) for a, p in zip(before, bench.model.parameters()))
