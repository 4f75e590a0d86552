"""Half Fine-Tuning: which tensors learn, and that the others never change."""

from __future__ import annotations

import functools
import re

import conftest
import lightning.pytorch as pl
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lomo_lightning import AdaLomo, LomoStrategy
from lomo_lightning.callbacks import HFTResampleCallback
from lomo_lightning.module import FusedCausalLMModule
from lomo_lightning.selection.hft import HalfFineTuning, HFTPatterns

# The paper's rule is per category: with three equal FFN matrices a block keeps 1/3 or 2/3 of its FFN,
# so a single block sits near, not at, the ratio; over every two blocks the FFN evens out.
BLOCK_TOLERANCE = 0.15
MODEL_TOLERANCE = 0.02


def tiny_llama(kv_heads: int = 4) -> nn.Module:
    return conftest.tiny_llama(layers=4, kv_heads=kv_heads)  # four blocks: HFT's draw evens out over pairs of them


def block_fractions(model: nn.Module, block_regex: str) -> dict[str, tuple[int, int]]:
    """Per block: (trainable, total) parameter counts."""
    counts: dict[str, tuple[int, int]] = {}
    for name, parameter in model.named_parameters():
        match = re.match(block_regex, name)
        if match:
            trainable, total = counts.get(match.group(0), (0, 0))
            learns = parameter.numel() if parameter.requires_grad else 0
            counts[match.group(0)] = (trainable + learns, total + parameter.numel())
    return counts


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("num_key_value_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_trainable_fraction_of_each_block_is_near_one_half_by_parameter_count(num_key_value_heads):
    model = tiny_llama(kv_heads=num_key_value_heads)
    HalfFineTuning(ratio=0.5, seed=3).apply(model)
    counts = block_fractions(model, r"model\.layers\.\d+\.")
    assert len(counts) == 4
    for trainable, total in counts.values():
        assert abs(trainable / total - 0.5) <= BLOCK_TOLERANCE
    assert abs(sum(t for t, _ in counts.values()) / sum(n for _, n in counts.values()) - 0.5) <= MODEL_TOLERANCE


@pytest.mark.parametrize("num_key_value_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_other_ratios_are_met_over_the_blocks(num_key_value_heads, ratio):
    # A block cannot keep a quarter of three FFN matrices, so only the sum over blocks meets the ratio.
    model = tiny_llama(kv_heads=num_key_value_heads)
    HalfFineTuning(ratio=ratio, seed=3).apply(model)
    counts = block_fractions(model, r"model\.layers\.\d+\.").values()
    assert abs(sum(t for t, _ in counts) / sum(n for _, n in counts) - ratio) <= MODEL_TOLERANCE


def test_half_of_each_category_is_frozen_as_in_the_paper():
    model = tiny_llama(kv_heads=4)
    mask = HalfFineTuning(seed=0).apply(model)
    ffn_frozen_counts = []
    for block in range(4):
        frozen = [name for name in mask.frozen if name.startswith(f"model.layers.{block}.")]
        assert sum(".self_attn." in name for name in frozen) == 2
        assert sum(name.endswith("layernorm") for name in frozen) == 1
        ffn_frozen_counts.append(sum(".mlp." in name for name in frozen))
    assert sorted(ffn_frozen_counts) == [1, 1, 2, 2]


def test_embeddings_lm_head_and_final_norm_stay_trainable_by_default():
    model = tiny_llama()
    HalfFineTuning().apply(model)
    assert model.model.embed_tokens.weight.requires_grad
    assert model.lm_head.weight.requires_grad
    assert model.model.norm.weight.requires_grad


def test_include_embeddings_selects_among_embeddings_and_lm_head():
    model = tiny_llama()
    mask = HalfFineTuning(include_embeddings=True).apply(model)
    embedding_modules = {"model.embed_tokens", "lm_head"}
    # Same size, ratio 0.5: exactly one of the two learns.
    assert len(embedding_modules & set(mask.frozen)) == 1
    assert model.model.embed_tokens.weight.requires_grad != model.lm_head.weight.requires_grad


def test_frozen_tensors_stay_bit_identical_and_hold_no_optimizer_state():
    model = tiny_llama(kv_heads=2)
    HalfFineTuning(seed=1).apply(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Built over every parameter, as re-sampling needs: frozen ones get no gradient, so AdamW skips them.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, optimizer)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert not torch.equal(parameter, start[name]), name
            assert optimizer.state[parameter], name
        else:
            assert torch.equal(parameter, start[name]), name
            assert parameter not in optimizer.state, name


def test_same_seed_same_mask_new_seed_new_mask():
    first = HalfFineTuning(seed=5).apply(tiny_llama())
    again = HalfFineTuning(seed=5).apply(tiny_llama())
    other = HalfFineTuning(seed=6).apply(tiny_llama())
    assert first.frozen == again.frozen
    assert first.frozen != other.frozen


def test_resample_draws_a_new_mask_unfreezes_the_old_half_and_drops_state_of_the_new_frozen_half():
    model = tiny_llama()
    hft = HalfFineTuning(seed=0)
    first = hft.apply(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, steps=1)
    second = hft.resample(model, optimizer=optimizer)
    assert hft.seed == 1
    assert second.frozen != first.frozen
    modules = dict(model.named_modules())
    for name in second.trainable:
        assert all(p.requires_grad for p in modules[name].parameters()), name
    for name in second.frozen:
        for parameter in modules[name].parameters():
            assert not parameter.requires_grad and parameter not in optimizer.state, name


class CausalLM(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_index):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randint(0, 128, (8, 12)), batch_size=2)


def fit(module: pl.LightningModule, callback: pl.Callback, max_steps: int) -> None:
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)


def frozen_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def test_callback_draws_a_new_mask_at_each_fit_and_each_stage_leaves_its_frozen_half_unchanged():
    module = CausalLM(tiny_llama())
    hft = HalfFineTuning(seed=0)
    callback = HFTResampleCallback(hft)
    stages = []
    for _ in range(2):
        before = {name: p.detach().clone() for name, p in module.named_parameters()}
        fit(module, callback, max_steps=2)
        frozen = frozen_names(module)
        assert all(torch.equal(p, before[n]) for n, p in module.named_parameters() if n in frozen)
        stages.append(frozen)
    assert stages[0] and stages[1] and stages[0] != stages[1]


def test_callback_every_n_steps_resamples_during_fit():
    module = CausalLM(tiny_llama())
    hft = HalfFineTuning(seed=0)
    hft.apply(module)
    callback = HFTResampleCallback(hft, every_n_steps=2, every_stage=False)
    fit(module, callback, max_steps=4)
    assert hft.seed == 2  # resampled after steps 2 and 4


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.AutoModelForCausalLM.from_config(config)


def tiny_gpt_neox() -> nn.Module:
    config = transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("build", "block_regex", "attention", "norms"),
    [
        (tiny_gpt2, r"transformer\.h\.\d+\.", (".attn.c_attn", ".attn.c_proj"), (".ln_1", ".ln_2")),
        (
            tiny_gpt_neox,
            r"gpt_neox\.layers\.\d+\.",
            (".attention.query_key_value", ".attention.dense"),
            (".input_layernorm", ".post_attention_layernorm"),
        ),
    ],
    ids=["gpt2", "gpt_neox"],
)
def test_gpt2_and_gpt_neox_presets_freeze_one_of_each_pair(build, block_regex, attention, norms):
    model = build()
    mask = HalfFineTuning(seed=0).apply(model)
    for block in block_fractions(model, block_regex):
        frozen = [name for name in mask.frozen if name.startswith(block)]
        assert sum(name.endswith(attention) for name in frozen) == 1
        assert sum(name.endswith(norms) for name in frozen) == 1
    counts = block_fractions(model, block_regex).values()
    assert abs(sum(t for t, _ in counts) / sum(n for _, n in counts) - 0.5) <= BLOCK_TOLERANCE


def test_unknown_architecture_says_what_to_pass():
    config = transformers.OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"model_type 'opt'.*preset=.*patterns="):
        HalfFineTuning().apply(model)


def test_custom_patterns_work_for_an_unknown_architecture():
    config = transformers.OPTConfig(
        vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    patterns = HFTPatterns(
        block=r"decoder\.layers\.\d+",
        categories={
            "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
            "ffn": ("fc1", "fc2"),
            "norm": ("self_attn_layer_norm", "final_layer_norm"),
        },
    )
    mask = HalfFineTuning(patterns=patterns).apply(model)
    assert len(mask.frozen) == 2 * (2 + 1 + 1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ratio"):
        HalfFineTuning(ratio=1.5)
    with pytest.raises(ValueError, match="preset"):
        HalfFineTuning(preset="bert")


def test_fused_training_equals_unfused_and_follows_a_resampled_mask():
    from lomo_lightning.fused import FusedUpdater

    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    models = [tiny_llama(kv_heads=2) for _ in range(2)]
    hfts = [HalfFineTuning(seed=0) for _ in models]
    for model, hft in zip(models, hfts):
        hft.apply(model)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2) for model in models]
    unfused, fused = models
    updater = FusedUpdater(fused, optimizers[1])
    for stage in range(2):
        if stage:
            for model, hft, optimizer in zip(models, hfts, optimizers):
                hft.resample(model, optimizer=optimizer)
            updater.refresh()
        for _ in range(2):
            unfused(input_ids=tokens, labels=tokens).loss.backward()
            optimizers[0].step()
            optimizers[0].zero_grad()
            updater.backward(fused(input_ids=tokens, labels=tokens).loss)
    for (name, expected), actual in zip(unfused.named_parameters(), fused.parameters()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)


def test_callback_every_n_steps_rebuilds_the_fused_hooks_under_lomo_strategy():
    from lomo_lightning.strategies import LomoStrategy

    module = CausalLM(tiny_llama())
    hft = HalfFineTuning(seed=0)
    first = set(hft.apply(module).frozen)
    trainer = pl.Trainer(
        max_steps=3,
        strategy=LomoStrategy(),
        callbacks=[HFTResampleCallback(hft, every_n_steps=2, every_stage=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer.fit(module)
    second = set(hft.mask.frozen)
    modules = dict(module.named_modules())

    def changed(module_name: str) -> bool:
        return any(
            not torch.equal(p, start[f"{module_name}.{n}"]) for n, p in modules[module_name].named_parameters()
        )

    # Step 3 ran with the second mask: what it unfroze learned, what both masks froze never moved.
    assert all(changed(name) for name in first - second)
    assert not any(changed(name) for name in first & second)


# -- resuming: the mask, its schedule and the optimizer state come back from the checkpoint -------


class LomoStrategyRestoringAfterSetup(LomoStrategy):
    """``strategy="lomo"`` restoring checkpoints after ``on_fit_start``, in the order FSDP strategies do."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def fused_hft_fit(
    module: pl.LightningModule,
    callback: HFTResampleCallback,
    max_epochs: int,
    checkpoint_dir=None,
    ckpt_path=None,
    strategy_cls: type[LomoStrategy] = LomoStrategy,
) -> tuple[pl.Trainer, str | None]:
    """Fit ``module`` with fused AdaLomo (``strategy="lomo"``) on 3 fixed batches per epoch; optionally checkpoint each epoch."""
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_last=True) if checkpoint_dir is not None else None
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        strategy=strategy_cls(),
        callbacks=[callback] + ([checkpoint] if checkpoint is not None else []),
        logger=False,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = torch.utils.data.DataLoader(conftest.batches(3), batch_size=None)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, checkpoint.last_model_path if checkpoint is not None else None


def fused_hft_module(seed: int = 0) -> tuple[pl.LightningModule, HalfFineTuning]:
    """A fresh tiny Llama under AdaLomo, with HFT's first mask (seed 0) applied as ``lomo-train`` does."""
    model = conftest.tiny_llama(seed=seed)
    hft = HalfFineTuning(seed=0)
    hft.apply(model)
    return FusedCausalLMModule(model, functools.partial(AdaLomo, lr=1e-2)), hft


def assert_same_training_state(resumed, resumed_trainer, expected, expected_trainer) -> None:
    """Bit-identical parameters, the same trainable set, and the same optimizer state (none for frozen tensors)."""
    for (name, p), q in zip(resumed.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), name
        assert p.requires_grad == q.requires_grad, name
    resumed_state = resumed_trainer.optimizers[0].state_dict()["state"]
    expected_state = expected_trainer.optimizers[0].state_dict()["state"]
    assert resumed_state.keys() == expected_state.keys()
    for index, state in expected_state.items():
        assert resumed_state[index].keys() == state.keys(), index
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(resumed_state[index][key]), torch.as_tensor(value)), (index, key)


RESTORE_ORDERS = pytest.mark.parametrize(
    "strategy_cls",
    [LomoStrategy, LomoStrategyRestoringAfterSetup],
    ids=["restore_before_fit_start", "restore_after_fit_start"],
)


@RESTORE_ORDERS
def test_resumed_fit_with_every_n_steps_resampling_equals_uninterrupted(tmp_path, strategy_cls):
    # Resample after steps 2, 4 and 6 of 6; the checkpoint after step 3 lies inside the second mask's window.
    full, full_hft = fused_hft_module()
    full_trainer, _ = fused_hft_fit(full, HFTResampleCallback(full_hft, every_n_steps=2), max_epochs=2)

    first, first_hft = fused_hft_module()
    _, checkpoint = fused_hft_fit(first, HFTResampleCallback(first_hft, every_n_steps=2), 1, checkpoint_dir=tmp_path)
    resumed, resumed_hft = fused_hft_module(seed=123)  # another init and the first mask: all must come from the checkpoint
    resumed_trainer, _ = fused_hft_fit(
        resumed, HFTResampleCallback(resumed_hft, every_n_steps=2), 2, ckpt_path=checkpoint, strategy_cls=strategy_cls
    )

    assert resumed_trainer.global_step == full_trainer.global_step == 6
    assert resumed_hft.seed == full_hft.seed == 3
    assert resumed_hft.mask == full_hft.mask
    assert_same_training_state(resumed, resumed_trainer, full, full_trainer)


@RESTORE_ORDERS
def test_resumed_stage_keeps_its_mask_and_the_next_stage_draws_the_uninterrupted_one(tmp_path, strategy_cls):
    # Three fits (continual-learning stages) with every_stage; the second is interrupted after one of its two epochs.
    full, full_hft = fused_hft_module()
    full_callback = HFTResampleCallback(full_hft)
    fused_hft_fit(full, full_callback, max_epochs=2)
    full_trainer, _ = fused_hft_fit(full, full_callback, max_epochs=2)
    stage_two_mask = full_hft.mask

    first, first_hft = fused_hft_module()
    first_callback = HFTResampleCallback(first_hft)
    fused_hft_fit(first, first_callback, max_epochs=2)
    _, checkpoint = fused_hft_fit(first, first_callback, max_epochs=1, checkpoint_dir=tmp_path)
    resumed, resumed_hft = fused_hft_module(seed=123)
    resumed_callback = HFTResampleCallback(resumed_hft)
    resumed_trainer, _ = fused_hft_fit(resumed, resumed_callback, 2, ckpt_path=checkpoint, strategy_cls=strategy_cls)

    assert resumed_hft.seed == full_hft.seed == 1
    assert resumed_hft.mask == stage_two_mask
    assert_same_training_state(resumed, resumed_trainer, full, full_trainer)

    # The third stage draws the same new mask in both runs.
    full_trainer, _ = fused_hft_fit(full, full_callback, max_epochs=1)
    resumed_trainer, _ = fused_hft_fit(resumed, resumed_callback, max_epochs=1)
    assert resumed_hft.seed == full_hft.seed == 2
    assert resumed_hft.mask == full_hft.mask != stage_two_mask
    assert_same_training_state(resumed, resumed_trainer, full, full_trainer)


def test_hft_state_dict_round_trip_applies_the_saved_mask_to_a_wrapped_model():
    model = tiny_llama()
    hft = HalfFineTuning(seed=4)
    hft.apply(model)  # names relative to the Hugging Face model
    state = hft.state_dict()

    wrapper = CausalLM(tiny_llama())  # names gain the prefix "model."
    restored = HalfFineTuning(seed=0)
    restored.apply(wrapper)
    restored.load_state_dict(state, model=wrapper)
    assert restored.seed == 4 and restored.mask == hft.mask
    assert frozen_names(wrapper) == {f"model.{name}" for name in frozen_names(model)}

    with pytest.raises(ValueError, match="mask names module"):
        HalfFineTuning().load_state_dict(state, model=tiny_gpt2())
