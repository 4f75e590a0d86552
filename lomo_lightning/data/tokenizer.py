"""Tokenizers: a hub/local one by name, or a byte-level BPE trained once on the stdlib and cached.

The trained tokenizer lets the whole pipeline run offline and from scratch (tiny models, tests). It is
trained on the stdlib *train* files only (default split), so validation text stays unseen, and it is
saved with ``save_pretrained`` so any Hugging Face code can load it from the cache directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lomo_lightning.cache_entries import store_entry, verified_entry
from lomo_lightning.data.stdlib import split_files, stdlib_source_files

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CACHE_ENV = "LOMO_LIGHTNING_CACHE"


def default_cache_dir() -> Path:
    """The cache root: ``$LOMO_LIGHTNING_CACHE`` or ``~/.cache/lomo_lightning``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/lomo_lightning").expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` as a ``Path``, or the default cache root when it is ``None``."""
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def stdlib_tokenizer_dir(vocab_size: int, max_files: int | None, cache_dir: str | os.PathLike | None) -> Path:
    """Where the stdlib BPE for these options lives (the stdlib differs between Python versions)."""
    python = ".".join(map(str, sys.version_info[:3]))
    files = "all" if max_files is None else str(max_files)
    return resolve_cache_dir(cache_dir) / "tokenizers" / f"stdlib-bpe-v{vocab_size}-f{files}-py{python}"


def train_stdlib_bpe(vocab_size: int = 8192, max_files: int | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the stdlib train files, with ``<|endoftext|>`` as bos/eos and ``<|pad|>`` as pad."""
    train_files, _ = split_files(stdlib_source_files(max_files))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((path.read_text(encoding="utf-8") for path in train_files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,  # source code: decode must give back the exact text
    )


def load_tokenizer(
    name_or_path: str | None = None,
    *,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    max_files: int | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load ``name_or_path`` with ``AutoTokenizer``, or (``None``) the cached stdlib BPE, training it once.

    A loaded tokenizer without a pad token gets its eos token as pad (labels are masked by the
    collators, so padding never enters the loss). ``vocab_size`` and ``max_files`` only apply to the
    stdlib BPE; ``cache_dir`` is the cache root (default: :func:`default_cache_dir`).
    """
    if name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, use_fast=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    target = stdlib_tokenizer_dir(vocab_size, max_files, cache_dir)
    if not verified_entry(target):  # absent, or not what was stored (planted, damaged): trained again
        log.info("Training a byte-level BPE (vocab %d) on the stdlib into %s", vocab_size, target)
        store_entry(target, train_stdlib_bpe(vocab_size, max_files).save_pretrained)
    return PreTrainedTokenizerFast.from_pretrained(target)


def resolve_tokenizer(
    tokenizer: PreTrainedTokenizerBase | str | None, *, vocab_size: int, cache_dir: str | os.PathLike | None
) -> PreTrainedTokenizerBase:
    """A ready tokenizer from what a data module was given: an instance, a name/path, or ``None`` (stdlib BPE)."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return load_tokenizer(tokenizer, vocab_size=vocab_size, cache_dir=cache_dir)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of everything that decides token ids, used to key tokenized-dataset caches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    special = repr(sorted(tokenizer.special_tokens_map.items()))
    template = getattr(tokenizer, "chat_template", None) or ""  # decides how prompts are rendered
    return hashlib.sha256(f"{state}\0{special}\0{template}".encode()).hexdigest()[:16]


__all__ = [
    "CACHE_ENV",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "default_cache_dir",
    "load_tokenizer",
    "resolve_tokenizer",
    "stdlib_tokenizer_dir",
    "tokenizer_fingerprint",
    "train_stdlib_bpe",
]
