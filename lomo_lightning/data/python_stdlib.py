"""Causal-LM corpus from the stdlib: every file plus eos, tokenized, concatenated and packed into blocks.

Packing wastes no compute on padding and makes every batch the same shape. Labels equal
``input_ids`` (the model shifts them), and the attention mask is all ones.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lomo_lightning.data.base import TokenizedDataModule
from lomo_lightning.data.cache import cache_key, cached_dataset_dict
from lomo_lightning.data.stdlib import split_files, split_halves, stdlib_source_files
from lomo_lightning.data.tokenizer import tokenizer_fingerprint

Subset = Literal["all", "first_half", "second_half"]


def pack_files(files: list[Path], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Tokenize each file's text followed by eos, concatenate everything and cut it into ``seq_len`` blocks.

    The final partial block is dropped, so every row has exactly ``seq_len`` tokens.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token: documents cannot be separated")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + [eos] for ids in encoded]}

    texts = Dataset.from_dict({"text": [path.read_text(encoding="utf-8") for path in files]})
    tokenized = texts.map(tokenize, batched=True, remove_columns=["text"], new_fingerprint="stdlib-tokenized")
    stream = np.concatenate([np.zeros(0, np.int32), *(np.asarray(ids, np.int32) for ids in tokenized["input_ids"])])
    n_blocks = len(stream) // seq_len
    blocks = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)
    return Dataset.from_dict({"input_ids": list(blocks)})


def collate_blocks(features: list[dict]) -> dict[str, Tensor]:
    """Stack packed blocks: attention everywhere, labels equal to the inputs (the model shifts them)."""
    input_ids = torch.tensor([row["input_ids"] for row in features], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


class PythonStdlibDataModule(TokenizedDataModule):
    """Language modelling on the running interpreter's standard library, split by file.

    Args:
        tokenizer: a tokenizer, a name/path for ``AutoTokenizer``, or ``None`` for the cached stdlib BPE.
        seq_len: tokens per packed block.
        batch_size: blocks per batch.
        vocab_size: vocabulary of the stdlib BPE (ignored for a given tokenizer).
        val_fraction: share of files held out for validation (by a stable hash of their path).
        max_files: use a deterministic sample of this many stdlib files (small corpora for tests).
        max_val_blocks: keep only the first blocks of validation, to bound its cost.
        num_workers: ``DataLoader`` workers.
        cache_dir: cache root for the tokenizer and tokenized datasets (default ``$LOMO_LIGHTNING_CACHE``
            or ``~/.cache/lomo_lightning``).
        seed: seeds the train/val split, the halves and the train shuffling.
        subset: train on ``"all"`` train files or one of two disjoint halves of them (forgetting
            experiments); validation is the same held-out files in every case.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        vocab_size: int = 8192,
        val_fraction: float = 0.05,
        max_files: int | None = None,
        max_val_blocks: int | None = None,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        subset: Subset = "all",
    ) -> None:
        super().__init__(
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            vocab_size=vocab_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
            seed=seed,
        )
        if subset not in ("all", "first_half", "second_half"):
            raise ValueError(f"subset must be 'all', 'first_half' or 'second_half', got {subset!r}")
        self.val_fraction = val_fraction
        self.max_files = max_files
        self.max_val_blocks = max_val_blocks
        self.subset = subset

    def split(self) -> tuple[list[Path], list[Path]]:
        """The ``(train, val)`` stdlib files this module uses (train restricted to ``subset``)."""
        train, val = split_files(stdlib_source_files(self.max_files), self.val_fraction, self.seed)
        if self.subset != "all":
            first, second = split_halves(train, self.seed)
            train = first if self.subset == "first_half" else second
        return train, val

    def prepare_data(self) -> None:
        """Train the tokenizer and tokenize the corpus once (rank zero), filling the disk caches."""
        self._load()

    def setup(self, stage: str | None = None) -> None:
        """Load the packed blocks from the cache (building them if ``prepare_data`` did not run)."""
        blocks = self._load()
        self.train_dataset = blocks["train"]
        val = blocks["val"]
        if self.max_val_blocks is not None:
            val = val.select(range(min(self.max_val_blocks, len(val))))
        self.val_dataset = val

    def _load(self) -> DatasetDict:
        tokenizer = self.tokenizer
        key = cache_key(
            kind="stdlib-lm",
            tokenizer=tokenizer_fingerprint(tokenizer),
            python=sys.version,
            seq_len=self.seq_len,
            val_fraction=self.val_fraction,
            max_files=self.max_files,
            seed=self.seed,
            subset=self.subset,
        )

        def build() -> DatasetDict:
            train, val = self.split()
            rank_zero_info(f"Tokenizing the stdlib corpus: {len(train)} train and {len(val)} val files")
            return DatasetDict(
                train=pack_files(train, tokenizer, self.seq_len), val=pack_files(val, tokenizer, self.seq_len)
            )

        blocks = cached_dataset_dict(self.cache_dir / "datasets" / f"stdlib-lm-{key}", build)
        for split, dataset in blocks.items():
            if len(dataset) == 0:
                raise ValueError(
                    f"the stdlib {split} split has no full block of {self.seq_len} tokens: "
                    "lower seq_len or raise max_files/val_fraction"
                )
        return blocks

    def collator(self) -> Callable[[list[dict]], dict[str, Tensor]]:
        return collate_blocks


__all__ = ["PythonStdlibDataModule", "Subset", "collate_blocks", "pack_files"]
