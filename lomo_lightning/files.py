"""Writing files that cannot be redirected: exclusive temporary names, never through a planted symbolic link, renamed into place.

Everything the app writes into a run directory or a cache (config, markers, checkpoints, the model,
staging folders) goes through these: a temporary name opened with ``O_EXCL | O_NOFOLLOW`` (a link or file
planted there makes the open fail instead of writing through it), fsynced, then renamed over the target,
which replaces the target itself (a link there included), never what it points to.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def remove_entry(path: Path) -> None:
    """Remove ``path`` whatever it is: a symbolic link (never what it points to), a file, or a real directory tree."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def exclusive_temporary(path: Path, suffix: str = ".partial") -> tuple[int, Path]:
    """Create an unused temporary file beside ``path`` (``.<name>.<pid>-<random><suffix>``); its descriptor and name.

    ``O_EXCL | O_NOFOLLOW``: a name planted in advance (a symbolic link to a victim file) makes the open fail
    instead of writing through it. The mode is the user's umask applied to 0o666, like any new file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(path))


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".partial") -> Iterator[IO[bytes]]:
    """Write ``path`` through a binary file object: to an exclusive temporary name, fsynced, then renamed over ``path``.

    The rename replaces ``path`` itself (a symbolic link there included), so readers see the old or the new
    content, never a mix, and nothing outside the directory is written. An exception removes the temporary
    file; a kill leaves it, under a name no reader opens.
    """
    target = Path(path)
    descriptor, temporary = exclusive_temporary(target, suffix)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, content: str | bytes) -> None:
    """Replace ``path`` by ``content`` (text is UTF-8) in one rename, never following a link (:func:`atomic_file`)."""
    with atomic_file(path) as file:
        file.write(content.encode() if isinstance(content, str) else content)


def fresh_directory(path: Path) -> Path:
    """An empty directory at ``path``, whatever was there (a link is removed, not followed); created with the umask."""
    remove_entry(path)
    path.mkdir(parents=True)
    return path


__all__ = ["atomic_file", "exclusive_temporary", "fresh_directory", "remove_entry", "write_atomically"]
