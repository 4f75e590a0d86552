"""Cache entries that check what they load: each records the SHA-256 of its content, checked before use.

An entry planted under a predictable key, or damaged, is rebuilt with a warning; a cache folder owned by
someone else or writable by every user is refused (:func:`check_cache_folder`). Entries are written to an
exclusive staging name with the user's umask and renamed into place. Used by every cache of the project:
tokenized datasets (:mod:`lomo_lightning.data.cache`), the stdlib tokenizer, GGUF conversions and the
DPO reference log-probabilities.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from lomo_lightning.files import exclusive_temporary, remove_entry, write_atomically

log = logging.getLogger(__name__)

# Beside each entry (inside a directory entry, ``<name>.sha256`` beside a file): the SHA-256 of its content.
DIGEST_FILE = "lomo-cache.sha256"
CACHE_HINT = "data.cache_dir=<folder> or LOMO_LIGHTNING_CACHE=<folder>"
# What datasets names the caches of `map`/`filter` that it writes into a loaded dataset's folder
DATASETS_MAP_CACHE = "cache-*.arrow"


class UnsafeCache(ValueError):
    """A cache folder others could plant entries in: refused (the message names the folder and the fix)."""


def check_cache_folder(directory: Path) -> None:
    """Refuse a cache folder owned by another user or writable by every user (as pip and Hugging Face do).

    Anyone who can write there could plant an entry under its predictable key, and the run would train
    on it. The folder and its parent (the cache root) are checked where they exist.
    """
    for folder in (directory, directory.parent):
        try:
            status = folder.stat()
        except FileNotFoundError:
            continue
        if hasattr(os, "getuid") and status.st_uid != os.getuid():
            raise UnsafeCache(
                f"cache folder {folder} belongs to another user (uid {status.st_uid}): its entries cannot be trusted; "
                f"use a folder of your own: {CACHE_HINT}"
            )
        if status.st_mode & stat.S_IWOTH:
            raise UnsafeCache(
                f"cache folder {folder} is writable by every user: anyone could plant an entry there; "
                f"chmod o-w {folder}, or {CACHE_HINT}"
            )


def _stored(file: Path) -> bool:
    """Whether ``file`` of a directory entry is part of what was stored.

    Not the digest file, and not the map caches that ``datasets`` writes beside a dataset it loaded
    (``cache-<fingerprint>.arrow``, e.g. the tokenized instructions): they are derived from the entry
    later, keyed by fingerprint, and only the folder's owner can write them (:func:`check_cache_folder`).
    """
    return file.is_file() and file.name != DIGEST_FILE and not fnmatch.fnmatch(file.name, DATASETS_MAP_CACHE)


def content_digest(path: Path) -> str:
    """SHA-256 of a file, or of a directory's stored files (their relative names and bytes, in order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if _stored(p)) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _digest_path(entry: Path) -> Path:
    return entry / DIGEST_FILE if entry.is_dir() else entry.with_name(f"{entry.name}.sha256")


def entry_problem(entry: Path) -> str | None:
    """Why a cache entry (a file or a directory) cannot be used: ``None`` when its content is what was stored."""
    if entry.is_symlink():
        return "a symbolic link"
    recorded = _digest_path(entry)
    if not recorded.is_file():
        return "no digest (not written by this version, or planted)"
    if recorded.read_text().strip() != content_digest(entry):
        return "its content is not what was stored (the digest differs)"
    return None


def _current_problem(entry: Path) -> str | None:
    """:func:`entry_problem`, read again if the entry was replaced while it was read (another process renaming a
    newer copy into place: a file vanishes mid-read); an entry that keeps vanishing is a problem."""
    for _ in range(3):
        try:
            return entry_problem(entry)
        except FileNotFoundError:
            continue
    return "it keeps changing while it is read"


def verified_entry(entry: Path) -> bool:
    """Whether the cache ``entry`` exists and holds what was stored; a bad one is logged (and will be rebuilt)."""
    check_cache_folder(entry.parent)
    if not (entry.exists() or entry.is_symlink()):
        return False
    problem = _current_problem(entry)
    if problem is not None:
        log.warning("Cache entry %s cannot be used (%s): rebuilding it", entry, problem)
        return False
    return True


def store_entry(entry: Path, write: Callable[[Path], object], directory: bool = True) -> Path:
    """Build a cache entry with ``write(staging)`` beside ``entry``, record its digest, and rename it into place.

    The staging name is exclusive and new (created with the user's umask, not 0o700, so users who share
    a cache folder can read each other's entries); a bad entry already at ``entry`` is replaced. A good one
    is kept: jobs of a sweep that build the same entry at once each find it missing, and the first to finish
    puts it in place; replacing it under the others would pull its files from under a job that reads it.
    """
    check_cache_folder(entry.parent)
    entry.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = entry.with_name(f".{entry.name}.{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()
    else:
        descriptor, staging = exclusive_temporary(entry, suffix="")
        os.close(descriptor)
    try:
        write(staging)
        if (entry.exists() or entry.is_symlink()) and _current_problem(entry) is None:
            return entry  # another process stored it first (the same key: the same content); ours goes
        write_atomically(_digest_path(staging) if directory else _digest_path(entry), content_digest(staging) + "\n")
        if entry.is_dir() and not entry.is_symlink():
            aside = entry.with_name(f".{entry.name}.{os.getpid()}-{secrets.token_hex(4)}.replaced")
            os.replace(entry, aside)
            remove_entry(aside)
        os.replace(staging, entry)
    except OSError:
        if _current_problem(entry) is not None:  # another process finishing the same entry first is fine
            raise
    finally:
        if staging.exists() or staging.is_symlink():
            remove_entry(staging)
    return entry


__all__ = [
    "UnsafeCache",
    "check_cache_folder",
    "content_digest",
    "entry_problem",
    "store_entry",
    "verified_entry",
]
