"""The running interpreter's standard library as a small, license-clean, always-available corpus.

Every Python install ships a few megabytes of well-written source code, so tests and examples can
train and evaluate without any download. All choices here (which files, which split) are pure
functions of the relative file paths, so every process and every run agrees on them.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable
from pathlib import Path

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


def stdlib_root() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def relative_key(path: Path, root: Path | None = None) -> str:
    """The POSIX path of ``path`` relative to ``root`` (the stdlib by default), the identity hashed by splits."""
    root = stdlib_root() if root is None else root
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) that depends only on ``salt`` and ``key`` (same in every process, unlike ``hash``)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def stdlib_source_files(max_files: int | None = None) -> list[Path]:
    """The ``.py`` files of the standard library, sorted by relative path.

    Skips installed packages, the test suites (``test``/``tests`` dirs, which also hold the
    ``lib2to3`` test data), ``idlelib`` and files that are not valid UTF-8. With ``max_files``, the
    files are a deterministic sample spread over the whole library (those with the smallest stable
    hash), so a small corpus still mixes many modules instead of only the alphabetically first ones.
    """
    root = stdlib_root()
    candidates = [
        path
        for path in root.rglob("*.py")
        if path.is_file() and not _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    if max_files is not None:
        candidates.sort(key=lambda path: stable_fraction(relative_key(path, root), "sample"))
    selected: list[Path] = []
    for path in candidates:
        if max_files is not None and len(selected) >= max_files:
            break
        if _is_utf8(path):
            selected.append(path)
    return sorted(selected, key=lambda path: relative_key(path, root))


def split_files(
    files: Iterable[Path], val_fraction: float = 0.05, seed: int = 0, root: Path | None = None
) -> tuple[list[Path], list[Path]]:
    """Split ``files`` into disjoint ``(train, val)`` lists, by file, from a stable hash of each relative path.

    A file's side depends only on its own path, ``seed`` and ``val_fraction``, so adding files never
    moves another file across the split. When at least two files are given and ``val_fraction > 0``,
    val holds at least one file (the one with the smallest hash), so tiny corpora still validate.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = list(files)
    scores = {path: stable_fraction(relative_key(path, root), f"split{seed}") for path in files}
    val = [path for path in files if scores[path] < val_fraction]
    if not val and val_fraction > 0 and len(files) >= 2:
        val = [min(files, key=scores.__getitem__)]
    val_set = set(val)
    return [path for path in files if path not in val_set], val


def split_halves(files: Iterable[Path], seed: int = 0, root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """Split ``files`` into two disjoint, roughly equal halves by a stable hash of each relative path.

    Meant for the training files of :func:`split_files` (e.g. stage 1 of a forgetting experiment on
    the first half, a later stage on the second). Like the train/val split, a file's half depends
    only on its own path and ``seed``.
    """
    files = list(files)
    first = [path for path in files if stable_fraction(relative_key(path, root), f"half{seed}") < 0.5]
    first_set = set(first)
    return first, [path for path in files if path not in first_set]


__all__ = ["relative_key", "split_files", "split_halves", "stable_fraction", "stdlib_root", "stdlib_source_files"]
