"""Causal language models: a Llama-architecture preset sized to the tokenizer, or any pretrained checkpoint."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A run cannot start as configured; the message names the problem and the fix."""


def build_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    name_or_path: str | None = None,
    llama: dict[str, Any] | None = None,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    seq_len: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """Build a causal LM and check that it fits the tokenizer and the sequence length.

    Exactly one of ``llama`` (a randomly initialised Llama model from these ``LlamaConfig`` values, its
    vocabulary sized to the tokenizer) and ``name_or_path`` (``AutoModelForCausalLM.from_pretrained``,
    local directory or hub name) must be given. Both checks run on the config, before any weight is made.

    Args:
        tokenizer: the data's tokenizer; its size bounds the ids the model sees.
        name_or_path: a pretrained checkpoint.
        llama: ``LlamaConfig`` keyword arguments for a model trained from scratch.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the weights.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% more compute).
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, or ``None`` for the model's default.
        trust_remote_code: run code shipped with a hub checkpoint; off unless asked for.
        seq_len: the training sequence length, checked against ``max_position_embeddings``.
        seed: seeds the random initialisation of a ``llama`` model.
    """
    if (name_or_path is None) == (llama is None):
        raise ConfigError("model: give exactly one of model.name_or_path (pretrained) and model.llama (from scratch)")
    torch_dtype = _dtype(dtype)
    if llama is not None:
        config: PretrainedConfig = LlamaConfig(
            **llama,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        source = "model.llama"
    else:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        source = name_or_path
    check_fits(config, tokenizer, seq_len, source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if llama is not None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    log.info("Model %s: %.1fM parameters, %s", source, model.num_parameters() / 1e6, torch_dtype)
    return model


def check_fits(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int | None, source: str) -> None:
    """Fail when the tokenizer has ids beyond the embedding, or ``seq_len`` beyond the positions the model knows."""
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model {source} embeds only {vocab_size}: "
            f"use the model's own tokenizer (data.tokenizer={source}) or a model built for this tokenizer"
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and max_positions is not None and seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len={seq_len} is longer than the {max_positions} positions of the model {source}: "
            f"set data.seq_len<={max_positions}"
        )


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"model.dtype={name!r} is not supported: use one of {', '.join(dtypes)}")
    return dtypes[name]


__all__ = ["ConfigError", "build_causal_lm", "check_fits"]
