"""A real pretrained model fine-tuned at the default learning rate keeps what it knew.

``lomo-train model=smollm2 data=py_instruct trainer=debug`` with no learning rate: at the from-scratch
default (AdaLomo 3e-2) four steps were enough for SmolLM2-135M-Instruct to stop answering "Paris"; at the
fine-tuning default the saved model, asked through its chat template, still does. Smaller batches than
the command's own, so that it runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import AutoModelForCausalLM, AutoTokenizer

from lomo_lightning.train import run

pytestmark = [pytest.mark.realmodel, pytest.mark.slow, pytest.mark.timeout(3600)]  # minutes alone, far longer on a busy machine


def answer(model_dir: Path, question: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_smollm2_fine_tuned_at_the_default_learning_rate_still_knows_the_capital_of_france(tmp_path, smollm2_dir, caplog):
    overrides = [
        f"output_dir={tmp_path}",
        "model=smollm2",
        "data=py_instruct",
        "trainer=debug",  # 4 steps; no learning rate given
        "trainer.detect_anomaly=false",
        "validate_before_training=false",
        "data.max_files=40",
        "data.max_val_examples=4",
        "data.batch_size=4",
        "data.seq_len=128",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
    ]
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with caplog.at_level(logging.INFO, logger="lomo_lightning.train"):
        run(cfg)
    first = next(record.getMessage() for record in caplog.records if record.name == "lomo_lightning.train")
    assert first.startswith("learning rate 0.0005, 10 warmup steps then cosine: AdaLomo's fine-tuning default")
    assert "Paris" in answer(tmp_path / "model", "What is the capital of France?")
