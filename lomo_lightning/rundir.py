"""A run directory that cannot be turned against its user: fresh or refused, written atomically, portable, secret-free.

- A new run refuses a directory that already holds something (another run, a user's files) unless
  ``overwrite=true``; :class:`~lomo_lightning.resume.RunDirectoryGuard` checks it before Hydra writes its own ``.hydra/`` and log,
  and remembers what was there, so that cleaning up after a failed start removes only what the run wrote.
- Every file the app writes goes through :mod:`lomo_lightning.files` (a temporary name that is never a
  planted link, renamed into place).
- The saved config names paths inside the run as ``${output_dir}/...``, so a run directory that is moved
  or copied continues where it now is, and never writes into the original.
- The saved and logged config keeps ``${oc.env:...}`` values unresolved and masks values of keys that look
  like secrets (``api_key``, ``*_token``, ``password``...), so no credential lands in a file or a logger.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lomo_lightning.files import remove_entry
from lomo_lightning.preflight import ConfigError

EXIT_CONFIG_ERROR = 2  # lomo-train's exit code for a configuration error
OUTPUT_DIR_REFERENCE = "${output_dir}"
MASK = "<masked>"
# Keys whose string values are credentials: ``api_key``, ``hf_token``, ``password``... (not ``pad_token``, a tokenizer's).
SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|password|passwd|secret|credentials?)$", re.IGNORECASE)
TOKENIZER_TOKEN = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask)_token$")
ENVIRONMENT_REFERENCE = re.compile(r"\$\{(oc\.env|env):")


# -- a new run gets a directory of its own ------------------------------------------------------------


@dataclass
class Found:
    """What a run directory held before this run (so that cleaning up removes only what the run wrote)."""

    directory: Path
    entries: frozenset[str]
    first_existing: Path  # the directory itself or its nearest existing parent


FOUND: Found | None = None  # recorded by RunDirectoryGuard in this process


def is_first_process() -> bool:
    """Not a process Lightning or a cluster launched for another rank (they share the first one's directory)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def check_fresh(directory: Path, overwrite: bool, ignored: Iterator[str] | tuple[str, ...] = ()) -> None:
    """A new run refuses a directory that already holds anything but ``ignored`` (unless ``overwrite``)."""
    if overwrite or not directory.is_dir():
        return
    held = sorted(set(os.listdir(directory)) - set(ignored))
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ConfigError(
            f"output_dir {directory} is not empty ({shown}): a new run needs a directory of its own; continue "
            f"the run there with resume={directory}, or replace it with overwrite=true"
        )


def record_found(directory: Path) -> Found:
    """Remember what ``directory`` holds now, before anything of this run is written."""
    global FOUND
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    entries = frozenset(os.listdir(directory)) if directory.is_dir() else frozenset()
    FOUND = Found(directory.absolute(), entries, existing.absolute())
    return FOUND


def discard_created(directory: Path, created: list[Path]) -> None:
    """Remove ``created`` (what a run that failed to start wrote) and then the directories it made, if empty.

    Nothing that was there before the run (:data:`FOUND`) is removed, a file or a directory.
    """
    found = FOUND if FOUND is not None and FOUND.directory == directory.absolute() else None
    for path in created:
        if found is not None and path.parent.absolute() == found.directory and path.name in found.entries:
            continue
        if path.exists() or path.is_symlink():
            remove_entry(path)
    stop = found.first_existing if found is not None else Path.cwd().absolute()
    current = directory.absolute()
    while current != stop and stop in current.parents:
        try:
            current.rmdir()  # only when empty
        except OSError:
            break
        current = current.parent


# -- the saved config: portable, without secrets ------------------------------------------------------


def relative_to_run(node: Any, output_dir: str) -> Any:
    """``node`` (a plain container) with each path inside ``output_dir`` written as ``${output_dir}/...``."""
    root = str(output_dir).rstrip(os.sep)
    if isinstance(node, dict):
        return {key: relative_to_run(value, root) for key, value in node.items()}
    if isinstance(node, list):
        return [relative_to_run(value, root) for value in node]
    if isinstance(node, str) and root:
        if node == root:
            return OUTPUT_DIR_REFERENCE
        if node.startswith(root + os.sep):
            return OUTPUT_DIR_REFERENCE + node[len(root) :]
    return node


def is_secret_key(key: object) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY.search(key)) and not TOKENIZER_TOKEN.match(key)


def savable_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` resolved for saving and logging: paths in the run as ``${output_dir}/...``, no secret in it.

    A value that reads the environment (``${oc.env:MY_TOKEN}``) stays that reference, resolved again when
    the run continues; a literal value of a key that looks like a secret is replaced by ``<masked>``.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    saved = _without_secrets(raw, resolved)
    relative = relative_to_run(saved, str(saved.get("output_dir") or ""))
    relative["output_dir"] = saved.get("output_dir")  # the directory it was written in (a moved run gets its new one)
    return relative


def _without_secrets(raw: Any, resolved: Any, key: object = None) -> Any:
    if isinstance(raw, str) and ENVIRONMENT_REFERENCE.search(raw):
        return raw
    if isinstance(resolved, dict) and isinstance(raw, dict):
        return {name: _without_secrets(raw.get(name), value, name) for name, value in resolved.items()}
    if isinstance(resolved, list) and isinstance(raw, list) and len(raw) == len(resolved):
        return [_without_secrets(r, value) for r, value in zip(raw, resolved, strict=True)]
    if isinstance(resolved, str) and resolved and is_secret_key(key):
        return MASK
    return resolved


__all__ = [
    "check_fresh",
    "discard_created",
    "is_first_process",
    "record_found",
    "relative_to_run",
    "savable_config",
]
