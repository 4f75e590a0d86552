"""On-disk cache of tokenized datasets, so the second run (and every DDP rank after the first) starts fast.

Entries are keyed by a hash of everything that decides their content and written to a temporary
sibling directory that is then renamed, so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
from datasets import DatasetDict, load_from_disk

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
        return _load_or_build(directory, build)


def _load_or_build(directory: Path, build: Callable[[], DatasetDict]) -> DatasetDict:
    if not directory.is_dir():
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            build().save_to_disk(str(staging))
            os.replace(staging, directory)
        except OSError:
            if not directory.is_dir():  # another process finishing first is fine; anything else is not
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_from_disk(str(directory))


__all__ = ["cache_key", "cached_dataset_dict", "quiet_progress_bars"]
