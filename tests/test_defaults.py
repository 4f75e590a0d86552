"""Defaults that fit the model: a pretrained model trains at each method's fine-tuning rate, a model from scratch at
its pre-training rate, a learning rate the user sets always wins, and the run says which it used and why."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import lomo_lightning.train  # noqa: F401  # registers the config's resolvers
from lomo_lightning.defaults import describe_learning_rate

# method -> (fine-tuning a pretrained model, from scratch): the papers' fine-tuning settings, today's from-scratch rates
RATES = {
    "adalomo": (5e-4, 3e-2),
    "lomo": (1e-2, 1e-1),
    "adamw": (2e-5, 3e-3),
    "sm3": (1e-3, 1e-3),
    "sft_adamw": (1e-4, 1e-4),
}
PRETRAINED = ["model=hf", "model.name_or_path=some/checkpoint"]


def composed(*overrides: str) -> DictConfig:
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        return compose("config", overrides=["output_dir=unused", *overrides])


@pytest.mark.parametrize("method", RATES)
def test_a_pretrained_model_trains_at_the_fine_tuning_rate_and_a_new_one_at_the_pre_training_rate(method):
    fine_tuning, from_scratch = RATES[method]
    assert composed(f"method={method}", *PRETRAINED).method.optimizer.lr == fine_tuning
    assert composed(f"method={method}", "model=smollm2").method.optimizer.lr == fine_tuning
    for model in ("tiny", "small", "llama2_7b"):  # built from random weights
        assert composed(f"method={method}", f"model={model}").method.optimizer.lr == from_scratch


@pytest.mark.parametrize("model", [PRETRAINED, ["model=tiny"]], ids=["pretrained", "from-scratch"])
def test_a_learning_rate_the_user_sets_wins(model):
    cfg = composed(*model, "method.optimizer.lr=0.0123")
    assert cfg.method.optimizer.lr == 0.0123
    assert describe_learning_rate(cfg).startswith("learning rate 0.0123, 10 warmup steps then cosine: method.optimizer.lr as given")


def test_the_run_says_which_rate_it_uses_and_why():
    pretrained = describe_learning_rate(composed(*PRETRAINED))
    assert pretrained.startswith("learning rate 0.0005, 10 warmup steps then cosine: AdaLomo's fine-tuning default")
    assert "model.name_or_path=some/checkpoint" in pretrained and "0.03 from scratch" in pretrained
    scratch = describe_learning_rate(composed("method=lomo"))
    assert scratch.startswith("learning rate 0.1, 10 warmup steps then cosine: Lomo's default for a model trained from scratch")
    assert "0.01 for a pretrained one" in scratch


def test_presets_that_load_a_model_fine_tune_it_at_the_methods_rate():
    """llama2_7b_gpu fine-tunes a real checkpoint: each method at its own fine-tuning rate, not AdaLomo's for all."""
    assert composed("experiment=llama2_7b_gpu").method.optimizer.lr == 5e-4
    assert composed("experiment=llama2_7b_gpu", "method=lomo").method.optimizer.lr == 1e-2
    # continual stage 2 loads stage 1's from-scratch model and goes on at stage 1's rate
    stage2 = composed("experiment=continual_stage2", "model.name_or_path=runs/stage1/model")
    assert stage2.method.optimizer.lr == composed("experiment=continual_stage1").method.optimizer.lr == 3e-2
