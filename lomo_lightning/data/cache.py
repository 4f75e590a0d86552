"""On-disk caches (tokenized datasets, the stdlib tokenizer, GGUF conversions, reference log-probabilities).

Entries are keyed by a hash of everything that decides their content and written to a temporary
sibling that is then renamed, so an interrupted run never leaves a half-written entry. Each entry
records the SHA-256 of its content, checked before it is used: an entry planted under a predictable key
or damaged is rebuilt, with a warning. A cache folder owned by someone else or writable by every user
is refused (:func:`check_cache_folder`). Entries get the user's umask, so a cache can be read by others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
from datasets import DatasetDict, load_from_disk

from lomo_lightning.cache_entries import (
    UnsafeCache,
    check_cache_folder,
    content_digest,
    entry_problem,
    store_entry,
    verified_entry,
)

# Bump when the content produced for the same options changes, to invalidate older entries.
CACHE_FORMAT = 1


def cache_key(**options: object) -> str:
    """A short stable hash of ``options`` (JSON-serialisable values) and the cache format version."""
    payload = json.dumps({"format": CACHE_FORMAT, **options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide ``datasets`` progress bars (map, save, load) for the duration, restoring the previous setting."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def cached_dataset_dict(directory: Path, build: Callable[[], DatasetDict]) -> DatasetDict:
    """Load the ``DatasetDict`` saved in ``directory``, or ``build`` it, save it atomically and return it."""
    with quiet_progress_bars():
        entry = cached_directory(directory, lambda staging: build().save_to_disk(str(staging)))
        return load_from_disk(str(entry))


def cached_directory(entry: Path, write: Callable[[Path], object]) -> Path:
    """``entry`` when it holds what was stored; else built with ``write(staging)`` (:func:`store_entry`)."""
    if not verified_entry(entry):
        store_entry(entry, write)
    return entry


__all__ = [
    "UnsafeCache",
    "cache_key",
    "cached_dataset_dict",
    "cached_directory",
    "check_cache_folder",
    "content_digest",
    "entry_problem",
    "quiet_progress_bars",
    "store_entry",
    "verified_entry",
]
