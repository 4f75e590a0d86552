"""A run directory is data, not code: what resume refuses to take from a run's saved ``config.yaml``.

Continuing a run rebuilds every object of its saved config (``_target_``), and a model or tokenizer
loaded with ``trust_remote_code`` runs the Python files beside it. A ``config.yaml`` edited by someone
else (a run directory copied from a shared disk, downloaded, unpacked) could name any importable callable
or any folder of code. So before a resume, each of these values of the saved config must equal what the
run's own command line (``.hydra/overrides.yaml``) composes from the installed ``conf/`` today:

- every ``_target_`` (what gets built),
- every ``trust_remote_code`` (whether a model's own Python runs),
- every model and tokenizer source (``name_or_path``, ``gguf_file``, ``tokenizer``).

A difference is refused in one line naming the key (a value the saved config drops, a callback set to
``null``, ``trust_remote_code: false``, is no risk and passes); ``resume_trusted=true`` accepts the run's values
knowingly. The command line typed with the resume is the user's own, and is not checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from lomo_lightning.models import converted_gguf_directory
from lomo_lightning.preflight import ConfigError

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
CODE_KEYS = frozenset({"_target_", "trust_remote_code", "name_or_path", "gguf_file", "tokenizer"})
# Keys of the command line that say how to continue, not what the run is.
COMMAND_KEYS = ("resume", "ckpt_path", "overwrite", "resume_trusted")


def check_resume_trusted(saved: DictConfig, directory: Path) -> None:
    """Refuse ``saved`` (a run's config, ``output_dir`` set to ``directory``) if it would build or load other code.

    Raises:
        ConfigError: naming the first key whose saved value differs from the recomposed one.
    """
    hint = f"if you trust {directory}, accept its config with resume_trusted=true"
    try:
        expected = recomposed(directory, saved)
    except ConfigError:
        raise
    except Exception as error:  # any failure to recompose: the run's values cannot be vouched for
        raise ConfigError(
            f"resume={directory}: its command line ({OVERRIDES_FILE}) no longer composes ({' '.join(str(error).split())}); {hint}"
        ) from None
    for key in sorted(set(code_keys(saved)) | set(code_keys(expected))):
        found, wanted = _value(saved, key), _value(expected, key)
        if key.endswith("trust_remote_code"):  # absent, null and false all mean off
            found, wanted = bool(found), bool(wanted)
        if found in (None, False):  # nothing built, no code trusted, a model from scratch: nothing to vouch for
            continue
        if found != wanted:
            raise ConfigError(
                f"resume={directory}: its config.yaml sets {key}={found!r} where its command line gives {wanted!r} "
                f"(a run directory is data: resume does not build or load other code from it); {hint}"
            )


def recomposed(directory: Path, saved: DictConfig) -> DictConfig:
    """The config the run's own command line composes from the installed ``conf/`` today (a model from GGUF converted)."""
    overrides = _run_overrides(directory / OVERRIDES_FILE)
    if GlobalHydra.instance().is_initialized():  # inside lomo-train (the Hydra app): compose with its loader
        fresh = compose("config", overrides=overrides)
    else:
        with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
            fresh = compose("config", overrides=overrides)
    with open_dict(fresh):
        fresh.output_dir = saved.output_dir  # Hydra's runtime value, unknown outside the run
        model = fresh.get("model")
        if isinstance(model, DictConfig) and model.get("gguf_file") and not saved.get("model", {}).get("gguf_file"):
            # the run trained on the cached conversion of the GGUF file, and saved that (train.use_converted_gguf)
            model.name_or_path = str(converted_gguf_directory(model.name_or_path, model.gguf_file, fresh.data.get("cache_dir")))
            model.gguf_file = None
    return fresh


def _run_overrides(path: Path) -> list[str]:
    """The run's command line, without Hydra's own settings and the keys that say how to continue."""
    if not path.is_file():
        return []
    lines = yaml.safe_load(path.read_text()) or []
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise ConfigError(f"{path} is not a list of overrides")
    kept = []
    for line, override in zip(lines, OverridesParser.create().parse_overrides(lines), strict=True):
        key = override.key_or_group
        if key in COMMAND_KEYS or key.startswith(("hydra.", "hydra/")):
            continue
        kept.append(line)
    return kept


def code_keys(cfg: DictConfig) -> Iterator[str]:
    """The keys of ``cfg`` (``a.b[0].c``) that name code to build or load."""
    yield from _walk(OmegaConf.to_container(cfg, resolve=False), "")


def _walk(node: Any, prefix: str) -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            key = f"{prefix}.{name}" if prefix else str(name)
            if name in CODE_KEYS and not isinstance(value, (dict, list)):
                yield key
            else:
                yield from _walk(value, key)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{prefix}[{index}]")


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=None)
    except Exception:  # an interpolation that cannot resolve here: compare what is written
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        value = node._get_node(leaf)._value() if isinstance(node, DictConfig) and leaf in node else None  # type: ignore[union-attr]
    return None if value == "" else value


__all__ = ["check_resume_trusted", "code_keys", "recomposed"]
