"""Continue a run: its own saved config, only the overrides typed with the resume, its directory, its last checkpoint.

``lomo-train resume=<run dir>`` or ``lomo-train ckpt_path=<run dir>/checkpoints/<file>.ckpt``. The run
directory is the run's ``output_dir``: it holds ``config.yaml`` (the resolved config the run trained
with) and ``checkpoints/``. The continued run takes that config, not the one composed from the command
line and today's ``conf/`` files, changes only the values typed on the command line together with the
resume (Hydra records them: ``HydraConfig.get().overrides.task``), and writes into the same directory
(``conf/config.yaml`` points ``hydra.run.dir`` at it with :func:`hydra_run_dir`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict

from lomo_lightning.preflight import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# Set on the command line to continue a run, never taken from the saved config.
RESUME_KEYS = ("resume", "ckpt_path")


def run_directory(resume: str | None, ckpt_path: str | None) -> Path | None:
    """The directory of the run to continue: ``resume``, or the run holding ``ckpt_path`` in its ``checkpoints/``."""
    if resume:
        return Path(resume)
    if ckpt_path:
        directory = Path(ckpt_path).parent.parent
        if (directory / CONFIG_FILE).is_file():
            return directory
    return None


def hydra_run_dir(resume: str | None, ckpt_path: str | None, default: str) -> str:
    """``hydra.run.dir``: the directory of the run being continued, else ``default``."""
    directory = run_directory(resume, ckpt_path)
    return str(directory) if directory is not None else default


def hydra_output_subdir(resume: str | None, ckpt_path: str | None) -> str | None:
    """``hydra.output_subdir``: ``.hydra``, but none when continuing a run, whose ``.hydra/`` stays the original."""
    return None if run_directory(resume, ckpt_path) is not None else ".hydra"


def last_checkpoint(directory: Path) -> Path | None:
    """``checkpoints/last.ckpt`` of a run, else its newest ``step-*.ckpt``, else ``None``."""
    checkpoints = directory / CHECKPOINT_DIR
    if (checkpoints / LAST_CHECKPOINT).exists():  # follows the symbolic link: a dangling one does not count
        return checkpoints / LAST_CHECKPOINT
    steps = sorted(checkpoints.glob("step-*.ckpt"))
    return steps[-1] if steps else None


def continued_config(cfg: DictConfig, overrides: Iterable[str], groups: Iterable[str]) -> tuple[DictConfig, list[str]]:
    """The config that continues the run named by ``cfg.resume`` / ``cfg.ckpt_path``, and how it differs from the run's.

    Args:
        cfg: the config Hydra composed from the command line.
        overrides: the command line's overrides (``HydraConfig.get().overrides.task``); each value
            override is applied to the run's saved config with the value Hydra composed for it.
        groups: the config groups (``HydraConfig.get().runtime.choices``): choosing another option of
            a group (``method=lomo``) cannot apply to a resolved config, and is refused.

    Returns:
        ``cfg`` unchanged when no run is continued; else the run's config with the overrides,
        ``ckpt_path`` (its last checkpoint, or ``None``: start over) and ``resume`` set, and one line
        ``key: old -> new`` per changed value.
    """
    directory = run_directory(cfg.get("resume"), cfg.get("ckpt_path"))
    if directory is None:
        if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).exists():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint: give <run dir>/checkpoints/last.ckpt")
        if cfg.get("ckpt_path"):
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path} is not in a run directory (no {CONFIG_FILE} two levels up): "
                f"continue a run with resume=<its output_dir>, or start a new one from a saved model with "
                "model=hf model.name_or_path=<output_dir>/model"
            )
        return cfg, []
    if not (directory / CONFIG_FILE).is_file():
        raise ConfigError(f"resume={directory}: no {CONFIG_FILE} there: give the output_dir of a lomo-train run")
    saved = cast(DictConfig, OmegaConf.load(directory / CONFIG_FILE))  # a run's config: a mapping
    if Path(saved.output_dir).resolve() != directory.resolve():
        raise ConfigError(
            f"resume={directory}: its {CONFIG_FILE} belongs to output_dir={saved.output_dir}: resume from there"
        )
    checkpoint = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else last_checkpoint(directory)
    if checkpoint is not None and not checkpoint.exists():
        raise ConfigError(f"ckpt_path={checkpoint}: no such checkpoint: give <run dir>/checkpoints/last.ckpt")
    continued = cast(DictConfig, OmegaConf.create(OmegaConf.to_container(saved)))
    _apply_overrides(continued, cfg, overrides, set(groups))
    with open_dict(continued):
        continued.resume = str(directory)
        continued.ckpt_path = str(checkpoint) if checkpoint is not None else None
    return continued, _differences(saved, continued)


def _apply_overrides(continued: DictConfig, composed: DictConfig, overrides: Iterable[str], groups: set[str]) -> None:
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key in RESUME_KEYS or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if key in groups:
            raise ConfigError(
                f"{override.input_line}: a continued run keeps the config groups it started with; "
                f"override values instead (e.g. {key}.<key>=...), or start a new run"
            )
        if override.type == OverrideType.DEL:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(continued, parent) if parent else continued
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        value: Any = OmegaConf.select(composed, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        OmegaConf.update(continued, key, value, merge=False, force_add=True)


def _differences(before: DictConfig, after: DictConfig) -> list[str]:
    old, new = _flatten(OmegaConf.to_container(before)), _flatten(OmegaConf.to_container(after))
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if key in RESUME_KEYS or old.get(key, _ABSENT) == new.get(key, _ABSENT):
            continue
        lines.append(f"{key}: {_show(old.get(key, _ABSENT))} -> {_show(new.get(key, _ABSENT))}")
    return lines


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}


__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LAST_CHECKPOINT",
    "continued_config",
    "hydra_output_subdir",
    "hydra_run_dir",
    "last_checkpoint",
    "run_directory",
]
