"""The contract HFT and SFT both meet: a checked config, apply before the optimizer, exact state, one matcher."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from lomo_lightning.selection import HalfFineTuning, HFTConfig, Selection, SFTConfig, SparseFineTuning, modules_matching

SELECTIONS = {
    "hft": lambda seed: HalfFineTuning(seed=seed),
    "sft": lambda seed: SparseFineTuning(density=0.05, seed=seed),
}


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", SELECTIONS)
def test_a_selection_meets_the_contract_and_its_state_restores_the_same_selection(kind):
    selection = SELECTIONS[kind](seed=3)
    assert isinstance(selection, Selection)
    model = tiny_llama()
    selection.apply(model)
    chosen = trainable(model)
    assert 0 < sum(p.numel() for p in chosen.values()) < sum(p.numel() for p in model.parameters())
    assert kind.upper() in selection.describe()

    state = selection.state_dict()
    restored, fresh = SELECTIONS[kind](seed=4), tiny_llama()  # another seed: only the state decides
    restored.apply(fresh)
    if kind == "sft":
        fresh.load_state_dict(model.state_dict())  # SFT's entries live in the model (indices are buffers)
        restored.load_state_dict(state)
    else:
        restored.load_state_dict(state, model=fresh)
    again = trainable(fresh)
    assert again.keys() == chosen.keys()
    if kind == "sft":
        for name, layer in selection.layers.items():
            assert torch.equal(restored.layers[name].indices, layer.indices), name


@pytest.mark.parametrize(
    "config, message",
    [
        (lambda: HFTConfig(ratio=1.5), "ratio"),
        (lambda: HFTConfig(preset="bert"), "preset"),
        (lambda: SFTConfig(density=0.0), "density"),
        (lambda: SFTConfig(regrowth="magnitude"), "regrowth"),
    ],
)
def test_a_bad_config_is_refused_naming_its_field(config, message):
    with pytest.raises(ValueError, match=message):
        config()


def test_a_selection_takes_a_config_or_its_fields_not_both():
    assert HalfFineTuning(HFTConfig(ratio=0.25)).config.ratio == 0.25
    assert HalfFineTuning(ratio=0.25).config == HFTConfig(ratio=0.25)
    for selection, config in ((HalfFineTuning, HFTConfig()), (SparseFineTuning, SFTConfig())):
        with pytest.raises(TypeError, match="not both"):
            selection(config, seed=1)


def test_modules_matching_searches_names_or_matches_whole_dotted_suffixes():
    wrapper = torch.nn.Module()
    wrapper.model = tiny_llama()  # names gain a "model." prefix, as inside a LightningModule
    searched = [name for name, _ in modules_matching(wrapper, ["q_proj"])]
    assert searched == [f"model.model.layers.{i}.self_attn.q_proj" for i in range(len(wrapper.model.model.layers))]
    blocks = [name for name, _ in modules_matching(wrapper, [r"model\.layers\.\d+"], whole_suffix=True)]
    assert blocks == [f"model.model.layers.{i}" for i in range(len(wrapper.model.model.layers))]
    assert modules_matching(wrapper, [r"layers\.\d+\.mlp|embed_tokens"], whole_suffix=True)[0][0] == "model.model.embed_tokens"
