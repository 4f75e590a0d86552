"""What every data module here shares: its tokenizer, its cache root and its two loaders.

Batches are Hugging Face style dicts (``input_ids``, ``attention_mask``, ``labels`` as LongTensors,
``-100`` where no loss), so any causal LM is trained with ``model(**batch).loss``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lomo_lightning.data.resumable import ResumableDataLoader
from lomo_lightning.data.tokenizer import resolve_cache_dir, resolve_tokenizer

MIN_SEQ_LEN = 8


class TokenizedDataModule(LightningDataModule, ABC):
    """Owns the tokenizer (built lazily, so a script can size the model before ``trainer.fit``) and the loaders.

    Subclasses fill ``train_dataset`` and ``val_dataset`` in ``setup`` and define ``collate``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | str | None,
        *,
        seq_len: int,
        batch_size: int,
        vocab_size: int,
        num_workers: int,
        cache_dir: str | os.PathLike | None,
        seed: int,
    ) -> None:
        super().__init__()
        if seq_len < MIN_SEQ_LEN:
            raise ValueError(f"seq_len must be at least {MIN_SEQ_LEN}, got {seq_len}: pass a larger seq_len")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.num_workers = num_workers
        self.cache_dir: Path = resolve_cache_dir(cache_dir)
        self.seed = seed
        self._tokenizer_spec = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        """Load (or train once and cache) the tokenizer; later calls return the same object."""
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(
                self._tokenizer_spec, vocab_size=self.vocab_size, cache_dir=self.cache_dir
            )
        return self._tokenizer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, built on first access (see :meth:`build_tokenizer`)."""
        return self.build_tokenizer()

    @abstractmethod
    def collator(self) -> Callable[[list[dict]], dict[str, Tensor]]:
        """A picklable function turning dataset rows into a batch of ``input_ids``, ``attention_mask``, ``labels``.

        It must not hold the data module (which references the trainer), so spawned workers stay cheap.
        """

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled in an order fixed by ``seed`` and the epoch, this process's share of it, resumable mid-epoch.

        Under a Trainer with several processes each takes its own share (Lightning's distributed sampler
        arguments); Lightning then leaves the loader's ``DistributedSampler`` as it is.
        """
        sharding = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        return ResumableDataLoader(
            self._require("train_dataset"),
            seed=self.seed,
            num_replicas=sharding.get("num_replicas", 1),
            rank=sharding.get("rank", 0),
            **self._loader_arguments(),
        )

    def val_dataloader(self) -> DataLoader:
        """In dataset order, so every validation pass sees the same batches."""
        return DataLoader(self._require("val_dataset"), shuffle=False, **self._loader_arguments())

    def _loader_arguments(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.collator(),
        }

    def _require(self, name: str) -> Dataset:
        dataset = getattr(self, name)
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{name} is not built yet: call setup() first")
        return dataset


__all__ = ["MIN_SEQ_LEN", "TokenizedDataModule"]
