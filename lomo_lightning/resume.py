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
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from lomo_lightning.checkpointing import metadata_problem
from lomo_lightning.preflight import ConfigError, one_line
from lomo_lightning.rundir import (
    ENVIRONMENT_REFERENCE,
    EXIT_CONFIG_ERROR,
    check_fresh,
    is_first_process,
    is_secret_key,
    record_found,
    relative_to_run,
)
from lomo_lightning.trust import check_resume_trusted

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# Set on the command line to continue a run, never taken from the saved config.
RESUME_KEYS = ("resume", "ckpt_path", "overwrite", "resume_trusted")


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
    candidates = checkpoints_newest_first(directory)
    return candidates[0] if candidates else None


def checkpoints_newest_first(directory: Path) -> list[Path]:
    """``checkpoints/last.ckpt`` (if its link is not dangling), then every ``step-*.ckpt``, the newest first."""
    checkpoints = directory / CHECKPOINT_DIR
    last = [checkpoints / LAST_CHECKPOINT] if (checkpoints / LAST_CHECKPOINT).exists() else []
    return last + sorted(checkpoints.glob("step-*.ckpt"), reverse=True)


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be loaded (``None``: it reads whole), without unpickling anything.

    A single-file checkpoint is a zip archive (``torch.save``): its directory and every member's CRC are
    checked, which finds a file cut short (a full disk, a copy interrupted) or damaged. A distributed
    checkpoint directory needs its ``.metadata`` to be the one saved (:func:`~lomo_lightning.checkpointing.metadata_problem`).
    """
    if checkpoint.is_dir():
        return metadata_problem(checkpoint)
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"unreadable ({' '.join(str(error).split()) or type(error).__name__})"
    return f"damaged ({broken})" if broken is not None else None


def intact_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint of the run that reads whole; one line says so when a newer one is damaged.

    Raises:
        ConfigError: when there are checkpoints and none of them is intact.
    """
    candidates = checkpoints_newest_first(directory)
    problems: list[str] = []
    for checkpoint in candidates:
        problem = damage(checkpoint)
        if problem is None:
            if problems:
                log.warning(
                    "%s: continuing from %s, the newest intact checkpoint", "; ".join(problems), checkpoint.name
                )
            return checkpoint
        problems.append(f"{checkpoint.relative_to(directory)}: {problem}")
    if problems:
        raise ConfigError(f"resume={directory}: no intact checkpoint ({'; '.join(problems)}): start a new run, or restore one")
    return None


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
    saved = saved_config(directory)
    if not cfg.get("resume_trusted"):
        check_resume_trusted(saved, directory)
    checkpoint = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else intact_checkpoint(directory)
    if cfg.get("ckpt_path") and checkpoint is not None:
        if not checkpoint.exists():
            raise ConfigError(f"ckpt_path={checkpoint}: no such checkpoint: give <run dir>/checkpoints/last.ckpt")
        problem = damage(checkpoint)
        if problem is not None:
            raise ConfigError(f"ckpt_path={checkpoint}: {problem}: give an intact checkpoint, or resume={directory}")
    continued = cast(DictConfig, OmegaConf.create(OmegaConf.to_container(saved)))
    _apply_overrides(continued, cfg, overrides, set(groups))
    with open_dict(continued):
        continued.resume = str(directory)
        continued.ckpt_path = str(checkpoint) if checkpoint is not None else None
        for key in ("overwrite", "resume_trusted"):  # how to continue: today's command line, never the saved value
            continued[key] = cfg.get(key, False)
    return continued, _differences(saved, continued)


def saved_config(directory: Path) -> DictConfig:
    """The run's ``config.yaml``, its paths in the run directory where the directory now is.

    A run saves its paths as ``${output_dir}/...`` (:func:`~lomo_lightning.rundir.savable_config`); older
    runs saved them absolute, and those under the saved ``output_dir`` are rebased too. So a run directory
    moved or copied elsewhere continues in place, and never writes into the original.
    """
    loaded = OmegaConf.to_container(OmegaConf.load(directory / CONFIG_FILE), resolve=False)
    if not isinstance(loaded, dict) or "output_dir" not in loaded:
        raise ConfigError(f"resume={directory}: its {CONFIG_FILE} is not a lomo-train run's config")
    rebased = relative_to_run(loaded, str(loaded["output_dir"]))
    rebased["output_dir"] = str(directory.absolute())
    return cast(DictConfig, OmegaConf.create(rebased))


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
        typed = _unresolved(composed, key)
        if isinstance(typed, str) and ENVIRONMENT_REFERENCE.search(typed):  # a secret stays a reference
            value = typed
        OmegaConf.update(continued, key, value, merge=False, force_add=True)


def _unresolved(cfg: DictConfig, key: str) -> Any:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return node._get_node(leaf)._value() if isinstance(node, DictConfig) and leaf in node else None  # type: ignore[union-attr]


def _differences(before: DictConfig, after: DictConfig) -> list[str]:
    old, new = _flatten(OmegaConf.to_container(before)), _flatten(OmegaConf.to_container(after))
    lines = []
    for key in sorted(old.keys() | new.keys()):
        if key in RESUME_KEYS or old.get(key, _ABSENT) == new.get(key, _ABSENT):
            continue
        if is_secret_key(key.rpartition(".")[2]):
            lines.append(f"{key}: changed (not shown: it looks like a secret)")
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
    "RunDirectoryGuard",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LAST_CHECKPOINT",
    "checkpoints_newest_first",
    "continued_config",
    "damage",
    "hydra_output_subdir",
    "hydra_run_dir",
    "intact_checkpoint",
    "last_checkpoint",
    "run_directory",
]


class RunDirectoryGuard(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): checks the run directory before Hydra writes to it.

    A new run into a non-empty directory is refused (``overwrite=true`` replaces it); ``resume=`` a directory
    without a run's ``config.yaml`` is refused. Both before Hydra creates ``.hydra/`` or its log there.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process():
            return
        try:
            self.check(config)
        except ConfigError as error:
            # Hydra turns a callback's Exception into a warning and goes on writing: stop here, as lomo-train
            # reports a configuration error (one line, exit code 2)
            print(f"lomo-train: {one_line(error)}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG_ERROR) from None

    @staticmethod
    def check(config: DictConfig) -> None:
        directory = Path(str(config.hydra.run.dir))
        resumed = run_directory(config.get("resume"), config.get("ckpt_path"))
        if config.get("resume") and not (Path(config.resume) / CONFIG_FILE).is_file():
            raise ConfigError(f"resume={config.resume}: no {CONFIG_FILE} there: give the output_dir of a lomo-train run")
        if resumed is None:
            check_fresh(directory, bool(config.get("overwrite")))
        record_found(directory)
