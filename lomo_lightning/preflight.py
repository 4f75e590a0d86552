"""Check a run's configuration before any work, so that every mistake is one line naming the key and the fix.

lomo-train runs these before it validates, trains or writes a file. Each raises
:class:`ConfigError`, the error of a run that cannot start as configured (defined here, raised by the whole app): values left missing (``???``), settings that cannot work
together, objects that cannot be built from their config node (an unknown argument, a bad value: the
optimizer and the LR schedule are built on a dummy parameter to find out), a model path that holds
no model, and a logger without its credentials.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from lomo_lightning._compat import full_key

# What to pass for a required value, by key; others get <value>.
REQUIRED_VALUE_HINTS = {
    "model.name_or_path": "<a directory written by save_pretrained, or a hub name>",
    "data.train_file": "<a .json, .jsonl or .parquet file>",
    "data.name": "<a datasets name or a local dataset directory>",
}
WANDB_OFFLINE_MODES = ("offline", "disabled", "dryrun")


class ConfigError(ValueError):
    """A run cannot start as configured; the message names the problem and the fix."""


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces collapsed, for a one-line error."""
    return " ".join(str(text).split())


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``; a bad argument, target or path is a ``ConfigError`` naming the node."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError, ImportError, OSError)) or cause is None:
            raise ConfigError(argument_error(node, cause or error)) from None
        raise


def argument_error(node: DictConfig, error: BaseException) -> str:
    """A one-line message for ``error`` raised while building ``node``, naming the key at fault where it can."""
    key = full_key(node) or "config"
    message = one_line(error)
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unexpected:
        name = unexpected.group(1)
        accepted = ", ".join(_arguments(node))
        return f"{key}.{name} is not an argument of {node._target_} (it takes {accepted}): remove it or correct its name"
    if isinstance(error, OSError) and node.get("name_or_path"):  # from_pretrained found nothing there
        return f"{key}.name_or_path={node.name_or_path}: {message}"
    named = {}  # the key the message names first
    for name in node:
        found = None if str(name).startswith("_") else re.search(rf"\b{re.escape(str(name))}\b", message)
        if found:
            named[found.start()] = name
    if named:
        name = named[min(named)]
        return f"{key}.{name!s}={node[name]}: {message}"  # a key from YAML or the command line: a str (or an int)
    return f"{key}: {message}"


def _arguments(node: DictConfig) -> list[str]:
    try:
        signature = inspect.signature(get_object(node._target_))
    except (ImportError, TypeError, ValueError):
        return []
    skipped = {"self", "params"}
    return [p.name for p in signature.parameters.values() if p.name not in skipped and p.kind != p.VAR_KEYWORD]


def check_required_values(cfg: DictConfig) -> None:
    """Every ``???`` value is given."""
    missing = sorted(_missing_keys(OmegaConf.to_container(cfg, resolve=False)))
    if missing:
        fixes = " ".join(f"{key}={REQUIRED_VALUE_HINTS.get(key, '<value>')}" for key in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"{', '.join(missing)} {verb} required: pass {fixes}")


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in _missing_keys(value, f"{prefix}{name}.")]
    if isinstance(node, list):
        return [key for index, value in enumerate(node) for key in _missing_keys(value, f"{prefix}{index}.")]
    return [prefix.rstrip(".")] if node == "???" else []


def check_fused_accumulation(cfg: DictConfig) -> None:
    """A fused method cannot accumulate gradients: refuse with the reason, before Lightning's manual-optimization error."""
    steps = cfg.trainer.get("accumulate_grad_batches", 1)
    if cfg.method.fused and steps > 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={steps} cannot work with a fused method: each gradient is applied "
            "inside backward and freed at once, so nothing is left to accumulate; set "
            "trainer.accumulate_grad_batches=1 and raise data.batch_size instead (model.gradient_checkpointing=true "
            "makes room)"
        )


def check_model_source(model: DictConfig) -> None:
    """A local ``model.name_or_path`` holds a model (hub names are left to ``from_pretrained``)."""
    name = model.get("name_or_path")
    if not name or model.get("gguf_file"):
        return
    path = Path(name).expanduser()
    looks_local = path.exists() or str(name).startswith(("/", ".", "~")) or str(name).count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={name}: no model there (no config.json): pass a directory written by "
            "save_pretrained (e.g. <output_dir>/model of a lomo-train run) or a hub name"
        )


def checked_method(method: DictConfig, max_steps: int) -> tuple[Any, Any]:
    """The optimizer and scheduler factories of ``method``, each tried once on a dummy parameter."""
    optimizer_factory = build(method.optimizer)
    try:
        optimizer = optimizer_factory([torch.nn.Parameter(torch.zeros(2, 2))])
    except (TypeError, ValueError) as error:
        raise ConfigError(argument_error(method.optimizer, error)) from None
    if method.scheduler is None:
        return optimizer_factory, None
    scheduler_factory = build(method.scheduler)
    try:
        scheduler_factory(optimizer=optimizer, num_training_steps=max(max_steps, 1))
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(argument_error(method.scheduler, error)) from None
    return optimizer_factory, scheduler_factory


def check_loggers(loggers: list[Any]) -> None:
    """A W&B logger that is not offline needs a login: without one, say how to log in or log offline."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger) or getattr(logger, "_offline", False):
            continue
        if os.environ.get("WANDB_MODE", "").lower() in WANDB_OFFLINE_MODES:
            continue
        import wandb

        try:
            wandb.login(verify=False)
        except wandb.errors.UsageError:
            raise ConfigError(
                "logger.wandb: no W&B login here: run `wandb login` or set WANDB_API_KEY, or log offline with "
                "logger.wandb.offline=true (or WANDB_MODE=offline) and `wandb sync <output_dir>/wandb/offline-run-*` later"
            ) from None


def settings_that_do_nothing(cfg: DictConfig) -> list[str]:
    """One line for each setting that is valid but cannot do what it is for: a learning rate of 0, FSDP on one process."""
    warnings = []
    lr = cfg.method.optimizer.get("lr")
    if lr is not None and float(lr) == 0.0:
        warnings.append(
            f"method.optimizer.lr=0: no parameter will change in the {cfg.trainer.max_steps} steps of this run "
            "(set a learning rate, or omit it for the method's default)"
        )
    processes = _process_count(cfg.trainer)
    if processes == 1 and _is_sharded(cfg):
        warnings.append(
            "strategy=fsdp on one process (trainer.devices=1): there is nothing to shard over, so FSDP only adds "
            "its overhead; use strategy=single, or trainer.devices=N (and trainer.num_nodes) to shard"
        )
    return warnings


def _process_count(trainer: DictConfig) -> int | None:
    """How many processes ``trainer.devices`` x ``trainer.num_nodes`` start; ``None`` when Lightning decides (``auto``)."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        count = devices
    elif OmegaConf.is_list(devices) or (isinstance(devices, str) and "," in devices):
        count = len(devices) if OmegaConf.is_list(devices) else len([d for d in devices.split(",") if d.strip()])
    else:
        return None
    return count * int(trainer.get("num_nodes", 1) or 1)


def _is_sharded(cfg: DictConfig) -> bool:
    if cfg.method.fused:
        return str(cfg.strategy.fused.get("_target_", "")).endswith("FSDPStrategy")
    return "fsdp" in str(cfg.strategy.unfused).lower()


def did_you_mean(error: BaseException) -> str:
    """For an unknown key (``method.optimizer.lrr=1``): ``"... did you mean method.optimizer.lr?"``, or ``""``.

    The nearest key of the same config node, by spelling (:func:`difflib.get_close_matches`).
    """
    cause = error if isinstance(error, (ConfigAttributeError, ConfigKeyError)) else error.__cause__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not isinstance(cause.parent_node, DictConfig):
        return ""
    key = str(cause.key)
    keys = [str(name) for name in cause.parent_node.keys() if not str(name).startswith("_")]
    nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not nearest:
        return ""
    full_key = str(cause.full_key)
    prefix = full_key[: -len(key)] if full_key.endswith(key) else ""
    return f"{full_key} is not a key of this config: did you mean {prefix}{nearest[0]}?"


__all__ = [
    "ConfigError",
    "argument_error",
    "build",
    "check_fused_accumulation",
    "check_loggers",
    "check_model_source",
    "check_required_values",
    "checked_method",
    "did_you_mean",
    "one_line",
    "settings_that_do_nothing",
]
