"""lomo-train: every configuration composes, runs offline, saves a loadable model, and bad input fails clearly."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from lomo_lightning.models import ConfigError
from lomo_lightning.train import run

METHODS = ["adalomo", "lomo", "adamw"]
SELECTIONS = ["full", "hft", "sft_ag", "sft_sm3"]

# A run of a few seconds on two CPU cores: small model, corpus, vocabulary, blocks and validation set.
TINY_MODEL = [
    "model.llama.hidden_size=32",
    "model.llama.intermediate_size=64",
    "model.llama.num_hidden_layers=2",
    "model.llama.num_attention_heads=4",
    "model.llama.num_key_value_heads=2",
]
TINY_STDLIB = ["data.max_files=20"]
TINY_RUN = [
    "data.vocab_size=300",
    "data.seq_len=32",
    "data.batch_size=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
]


# Preference pairs from a sample of the stdlib: prompts with docstrings need longer sequences than TINY_RUN's.
TINY_PAIRS = ["data=py_preference", "data.max_files=60", "data.val_fraction=0.25", "data.seq_len=384"]


def tiny(*overrides: str) -> list[str]:
    """``overrides`` after the tiny settings that apply to the model and data they choose."""
    groups = dict(override.split("=", 1) for override in overrides if override.startswith(("model=", "data=")))
    model = TINY_MODEL if groups.get("model", "tiny") == "tiny" else []
    data = TINY_STDLIB if groups.get("data", "python_stdlib") == "python_stdlib" else []
    return [*model, *data, *TINY_RUN, *overrides]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (stdlib tokenizer and tokenized corpus) for the whole file: it is built by the first run."""
    return tmp_path_factory.mktemp("cache")


def config(output_dir: Path, cache_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        return compose("config", overrides=tiny(f"output_dir={output_dir}", f"data.cache_dir={cache_dir}", *overrides))


def subprocess_env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "LOMO_LIGHTNING_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def test_default_run_saves_a_model_that_reloads_with_the_same_logits(tmp_path, cache_dir):
    metrics, module = run(config(tmp_path, cache_dir))

    assert {"val/loss_before", "val/loss", "val/ppl"} <= set(metrics)
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    logged = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in logged and "val/loss" in logged and "perf/tokens_per_s" in logged

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    torch.testing.assert_close(reloaded(tokens).logits, module.model(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "selection"), itertools.product(METHODS, SELECTIONS))
def test_every_method_composes_with_every_selection(tmp_path, method, selection):
    cfg = config(tmp_path, tmp_path, f"method={method}", f"selection={selection}")
    OmegaConf.resolve(cfg)
    assert cfg.method.fused == (method != "adamw")
    assert (cfg.selection.selector is None) == (selection == "full")


@pytest.mark.parametrize(("method", "selection"), [("lomo", "hft"), ("adamw", "sft_ag")])
def test_a_fused_and_an_unfused_method_train_with_a_selection(tmp_path, cache_dir, method, selection):
    # the fused run also computes its loss in chunks of tokens
    chunks = ["loss_chunk_tokens=16"] if method == "lomo" else []
    metrics, module = run(config(tmp_path, cache_dir, f"method={method}", f"selection={selection}", *chunks))
    assert module.trainer.global_step == 2
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert (tmp_path / "model" / "sparse_delta.safetensors").is_file() == selection.startswith("sft")


def test_a_short_hft_adalomo_dpo_run_raises_held_out_reward_accuracy_above_chance(tmp_path, cache_dir):
    """Held-out functions (other files): the real body must gain reward over its lines shuffled, in 30 steps."""
    steps = ["trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.limit_val_batches=1.0"]
    schedule = ["method.scheduler.name=constant_with_warmup", "method.scheduler.num_warmup_steps=5"]
    pairs = ["data.max_files=100", "data.val_fraction=0.3", "data.max_val_examples=48", "data.batch_size=4"]
    metrics, module = run(config(tmp_path, cache_dir, "objective=dpo", "selection=hft", *TINY_PAIRS, *pairs, *steps, *schedule))
    held_out = len(module.trainer.datamodule.val_dataset)
    assert module.trainer.global_step == 30 and held_out >= 30
    assert metrics["val/rewards/accuracies_before"] == 0.0, "before training the policy is the reference: no margins"
    # 0.75 here; at chance, 65% of 36 pairs or more has a probability of 0.04
    assert metrics["val/rewards/accuracies"] > 0.65, metrics
    assert metrics["val/loss"] < metrics["val/loss_before"]
    assert len(list((cache_dir / "reference_logps").glob("*.safetensors"))) == 2, "train and val pairs, cached"


class InterruptAtStep(pl.Callback):
    """Presses Ctrl-C when training reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_leaves_a_loadable_checkpoint_to_resume_from(tmp_path, cache_dir):
    interrupt = [f"+callbacks.interrupt._target_={__name__}.InterruptAtStep", "+callbacks.interrupt.step=3"]
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C while it shuts down
    try:
        with pytest.raises(SystemExit):
            run(config(tmp_path, cache_dir, "trainer.max_steps=4", *interrupt))
    finally:
        signal.signal(signal.SIGINT, sigint)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert not (tmp_path / "model").exists()

    _, module = run(config(tmp_path, cache_dir, "trainer.max_steps=4", f"ckpt_path={last}"))
    assert module.trainer.global_step == 4


def test_wandb_offline_run_records_the_config_and_metrics(tmp_path, cache_dir):
    run(config(tmp_path, cache_dir, "logger=wandb", "logger.wandb.offline=true"))
    (records,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    keys = (b"train/loss", b"val/loss", b"perf/tokens_per_s", b"optimized_metric", b"lomo_lightning.AdaLomo")
    # wandb's service process writes the records file behind finish(); give a loaded machine time to flush
    deadline = time.monotonic() + 60
    while not all(key in records.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    logged = records.read_bytes()
    for key in keys:
        assert key in logged


def test_multirun_leaves_one_result_directory_per_job(tmp_path, cache_dir):
    sweep = tmp_path / "multirun"
    command = [sys.executable, "-m", "lomo_lightning.train", "-m", "method=lomo,adalomo", f"hydra.sweep.dir={sweep}"]
    subprocess.run(command + tiny(), check=True, env=subprocess_env(cache_dir), capture_output=True, timeout=300)
    for job in ("0", "1"):
        assert (sweep / job / "model" / "config.json").is_file()
        assert (sweep / job / "csv" / "metrics.csv").is_file()
    assert OmegaConf.load(sweep / "1" / "config.yaml").method.optimizer._target_ == "lomo_lightning.AdaLomo"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=jsonl", "data.train_file={tmp}/missing.jsonl"], "instruction file not found"),
        (["data=jsonl", "data.train_file={tmp}/empty.jsonl"], "is empty"),
        (["data=jsonl", "data.train_file={tmp}/no_output.jsonl"], "has no 'output' field"),
        (["data.seq_len=64", "model.llama.max_position_embeddings=32"], "data.seq_len=64 is longer than the 32"),
        (["loss_chunk_tokens=0"], "loss_chunk_tokens=0: chunk_tokens must be >= 1"),
        (["objective=dpo"], "objective=dpo trains on preference pairs: use data=py_preference"),
        (TINY_PAIRS, "PyPreferenceDataModule holds preference pairs: train on them with objective=dpo"),
        (["objective=dpo", "objective.loss_type=hinge", *TINY_PAIRS], "objective: loss_type must be one of sigmoid, ipo"),
    ],
    ids=["missing-file", "empty-file", "missing-field", "seq-len", "loss-chunk", "dpo-data", "pairs-sft", "dpo-loss"],
)
def test_bad_input_is_a_config_error_naming_the_problem(tmp_path, cache_dir, overrides, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "no_output.jsonl").write_text('{"instruction": "x"}\n' * 4)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run(config(run_dir, cache_dir, *(override.format(tmp=tmp_path) for override in overrides)))
    assert list(run_dir.iterdir()) == []


def test_an_output_directory_that_cannot_be_written_is_refused(tmp_path, cache_dir):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="output_dir .* is not writable"):
        run(config(tmp_path / "a_file" / "run", cache_dir))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, cache_dir):
    checkpoint = tmp_path / "small_vocab_model"
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1).save_pretrained(checkpoint)
    overrides = ["model=hf", f"model.name_or_path={checkpoint}", "data.tokenizer=null"]
    with pytest.raises(ConfigError, match="the tokenizer has 300 tokens but the model .* embeds only 64"):
        run(config(tmp_path / "run", cache_dir, *overrides))


def test_the_console_script_reports_errors_in_one_line_and_exits_with_1(tmp_path, cache_dir):
    env = subprocess_env(cache_dir)
    base = [sys.executable, "-m", "lomo_lightning.train", f"hydra.run.dir={tmp_path / 'hydra'}"]
    missing_file = ["data=jsonl", f"data.train_file={tmp_path / 'nope.jsonl'}"]
    missing = subprocess.run(base + tiny(*missing_file), env=env, capture_output=True, text=True)
    assert missing.returncode == 1
    assert "lomo-train: data: instruction file not found" in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr

    unknown = subprocess.run(base + tiny("method.optimizer.learning_rate=1"), env=env, capture_output=True, text=True)
    assert unknown.returncode == 1
    assert "Could not override 'method.optimizer.learning_rate'" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_trust_remote_code_is_off_unless_asked_for(tmp_path):
    for model in ("tiny", "small", "llama2_7b", "hf"):
        assert config(tmp_path, tmp_path, f"model={model}").model.trust_remote_code is False


@pytest.mark.distributed
def test_sparse_fine_tuning_on_two_fsdp_ranks_saves_a_model_its_delta_rebuilds(tmp_path, cache_dir):
    """The app under strategy=fsdp: shards trained, then one consolidated model and one sparse delta."""
    from lomo_lightning.data import load_tokenizer
    from lomo_lightning.selection import apply_sparse_delta

    overrides = ["selection=sft_sm3", "selection.selector.reselection_steps=1", "strategy=fsdp", "trainer.devices=2"]
    command = [sys.executable, "-m", "lomo_lightning.train", f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}"]
    done = subprocess.run(command + tiny(*overrides), env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    cfg = OmegaConf.load(tmp_path / "config.yaml")
    assert cfg.trainer.devices == 2 and cfg.strategy.fused._target_.endswith("LomoFSDPStrategy")

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base = instantiate(cfg.model, tokenizer=load_tokenizer(str(tmp_path / "model")), seq_len=cfg.data.seq_len)
    untouched = {name: value.clone() for name, value in base.state_dict().items()}
    apply_sparse_delta(base, tmp_path / "model" / "sparse_delta.safetensors")
    rebuilt = base.state_dict()
    assert max((trained.state_dict()[name] - value).abs().max().item() for name, value in untouched.items()) > 1e-5
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(rebuilt[name], value, rtol=0, atol=1e-6, msg=name)
