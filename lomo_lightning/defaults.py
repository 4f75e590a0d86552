"""The learning rate that fits the model: a rule's fine-tuning rate for a pretrained model, its pre-training rate from scratch.

A rule's good learning rate depends on where the weights start. From random weights (``model=tiny``,
``model=small``) the rates are large (AdaLomo 3e-2); a pretrained model trained at those forgets what it
knew within a few steps (SmolLM2 stops answering "Paris"). So every ``conf/method/*.yaml`` gives both::

    lr: ${lomo_lr:${pretrained},<fine-tuning rate>,<from-scratch rate>}

and ``conf/config.yaml``'s ``pretrained`` says which applies: true when the model is loaded from
``model.name_or_path`` (a hub name, a ``save_pretrained`` directory, a GGUF file: ``model=hf``,
``model=smollm2``). A value typed for ``method.optimizer.lr`` (command line, ``experiment=`` preset, a
resumed run's own config) replaces the interpolation and always wins. :func:`describe_learning_rate` is the
line the run starts with: the rate it uses, and why.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

RESOLVER = "lomo_lr"
_DEFAULT = re.compile(r"^\$\{" + RESOLVER + r":\s*\$\{pretrained\}\s*,\s*([^,\s]+)\s*,\s*([^,\s}]+)\s*\}$")


def learning_rate_for(pretrained: bool, fine_tuning: float, from_scratch: float) -> float:
    """``fine_tuning`` for a pretrained model, ``from_scratch`` otherwise."""
    return float(fine_tuning if pretrained else from_scratch)


def loads_weights(name_or_path: object) -> bool:
    """A model built from ``model.name_or_path`` starts from trained weights (``null``: built from scratch)."""
    return bool(name_or_path)


OmegaConf.register_new_resolver(RESOLVER, learning_rate_for, replace=True)
OmegaConf.register_new_resolver("lomo_loads_weights", loads_weights, replace=True)


def describe_learning_rate(cfg: DictConfig) -> str:
    """One line: the learning rate ``cfg`` trains at, where it comes from, and its warmup."""
    optimizer = cfg.method.optimizer
    rule = str(optimizer._target_).rsplit(".", 1)[-1]
    lr = float(optimizer.lr)
    scheduler = cfg.method.get("scheduler")
    warmup = ""
    if scheduler is not None:
        warmup = f", {scheduler.get('num_warmup_steps', 0)} warmup steps then {scheduler.get('name', 'its schedule')}"
    raw = OmegaConf.to_container(optimizer, resolve=False).get("lr")  # type: ignore[union-attr]  # a DictConfig's
    default = _DEFAULT.match(str(raw)) if isinstance(raw, str) else None
    if default is None:
        return f"learning rate {lr:g}{warmup}: method.optimizer.lr as given (command line, experiment= preset or the run's config)"
    fine_tuning, from_scratch = (float(value) for value in default.groups())
    if cfg.pretrained:
        why = (
            f"{rule}'s fine-tuning default, for a pretrained model (model.name_or_path={cfg.model.name_or_path}); "
            f"{from_scratch:g} from scratch"
        )
    else:
        why = f"{rule}'s default for a model trained from scratch; {fine_tuning:g} for a pretrained one"
    return f"learning rate {lr:g}{warmup}: {why}; set method.optimizer.lr=<value> to choose another"


__all__ = ["RESOLVER", "describe_learning_rate", "learning_rate_for", "loads_weights"]
