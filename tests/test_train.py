"""lomo-train: every configuration composes, runs offline, saves a loadable model, continues exactly, and bad input
fails clearly."""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from app_plugins import RecordModesAtFirstStep
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lomo_lightning import train as train_module
from lomo_lightning.models import ConfigError
from lomo_lightning.resume import continued_config
from lomo_lightning.train import main, run

TESTS = Path(__file__).parent

METHODS = ["adalomo", "lomo", "adamw"]

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
    """The environment of a lomo-train subprocess: offline, sharing the cache, able to import tests/app_plugins.py."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "LOMO_LIGHTNING_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": path,
    }


def lomo_train(cache_dir: Path, *arguments: str) -> subprocess.Popen:
    """Start ``lomo-train *arguments`` (the console script's code) in a subprocess, its output into a file."""
    command = [sys.executable, "-m", "lomo_lightning.train", *arguments]
    output = tempfile.TemporaryFile(mode="w+")  # not a pipe: runs in parallel would block on a full one
    process = subprocess.Popen(command, env=subprocess_env(cache_dir), stdout=output, stderr=subprocess.STDOUT, text=True)
    process.output = output
    return process


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for ``process``; its exit code and its output."""
    process.wait(timeout=timeout)
    process.output.seek(0)
    return process.returncode, process.output.read()


def logged_rows(run_dir: Path) -> list[dict[str, str]]:
    """``metrics.csv`` without the timing and memory columns, which differ between any two runs."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in csv.DictReader(file)]


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


COMBINATIONS = [*itertools.product(METHODS, ["full", "hft", "sft_ag"]), ("sm3", "sft_sm3")]  # SpIEL-MA needs the SM3 rule


@pytest.mark.parametrize(("method", "selection"), COMBINATIONS)
def test_every_method_steps_with_every_selection_and_leaves_the_rest_bit_identical(tmp_path, method, selection):
    """The method and selection the app composes, built as it builds them: one step changes exactly the selected tensors."""
    from conftest import batches, tiny_llama

    from lomo_lightning import FusedUpdater
    from lomo_lightning.preflight import checked_method
    from lomo_lightning.train import apply_selection

    cfg = config(tmp_path, tmp_path, f"method={method}", f"selection={selection}")
    model = tiny_llama()
    factory, _ = checked_method(cfg.method, max_steps=1)
    if cfg.selection.selector is not None:
        apply_selection(cfg.selection.selector, model, factory)
    selected = {name for name, p in model.named_parameters() if p.requires_grad}
    assert (len(selected) < len(list(model.parameters()))) == (selection != "full")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = factory([p for p in model.parameters() if p.requires_grad])
    batch = batches(1)[0]
    if cfg.method.fused:
        assert FusedUpdater(model, optimizer).backward(model(**batch).loss)
    else:
        model(**batch).loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert {name for name in before if not torch.equal(before[name], after[name])} == selected


@pytest.mark.parametrize(("method", "selection"), [("lomo", "hft"), ("adamw", "sft_ag")])
def test_a_fused_and_an_unfused_method_train_with_a_selection(tmp_path, cache_dir, method, selection):
    # the fused run also computes its loss in chunks of tokens
    chunks = ["loss_chunk_tokens=16"] if method == "lomo" else []
    metrics, module = run(config(tmp_path, cache_dir, f"method={method}", f"selection={selection}", *chunks))
    assert module.trainer.global_step == 2
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert (tmp_path / "model" / "sparse_delta.safetensors").is_file() == selection.startswith("sft")


@pytest.mark.parametrize("rounding", [None, "kahan"])
def test_bf16_true_trains_bf16_weights_with_the_chosen_rounding(tmp_path, cache_dir, rounding):
    choice = [f"method.optimizer.rounding={rounding}"] if rounding else []
    _, module = run(config(tmp_path, cache_dir, "trainer.precision=bf16-true", "seed=7", *choice))
    group = module.trainer.optimizers[0].param_groups[0]
    assert group["rounding"] == (rounding or "stochastic") and group["seed"] == 7, "stochastic by default, seeded by the run"
    assert all(p.dtype == torch.bfloat16 for p in module.model.parameters())


def test_a_short_hft_adalomo_dpo_run_raises_held_out_reward_accuracy_above_chance(tmp_path, cache_dir):
    """Held-out functions (other files): the real body must gain reward over its lines shuffled, in 30 steps.

    The shuffled lines are the smoke option: a model from scratch cannot learn the hard pairs in 30 steps."""
    steps = ["trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.limit_val_batches=1.0"]
    schedule = ["method.scheduler.name=constant_with_warmup", "method.scheduler.num_warmup_steps=5"]
    pairs = ["data.max_files=100", "data.val_fraction=0.3", "data.max_val_examples=48", "data.batch_size=4", "data.rejected=shuffled_lines"]
    metrics, module = run(config(tmp_path, cache_dir, "objective=dpo", "selection=hft", *TINY_PAIRS, *pairs, *steps, *schedule))
    held_out = len(module.trainer.datamodule.val_dataset)
    assert module.trainer.global_step == 30 and held_out >= 30
    assert metrics["val/rewards/accuracies_before"] == 0.0, "before training the policy is the reference: no margins"
    # 0.75 here; at chance, 65% of 36 pairs or more has a probability of 0.04
    assert metrics["val/rewards/accuracies"] > 0.65, metrics
    assert metrics["val/loss"] < metrics["val/loss_before"]
    assert len(list((cache_dir / "reference_logps").glob("*.safetensors"))) == 2, "train and val pairs, cached"


def test_resuming_a_finished_dpo_run_reports_the_validation_rewards_of_its_end(tmp_path, cache_dir, monkeypatch):
    """The resumed run validates against the reference of the run's start (its checkpoint names it), not its trained weights."""
    reports: list[dict[str, float]] = []
    monkeypatch.setattr(train_module, "report", lambda output_dir, model_dir, trainer, metrics: reports.append(metrics))
    run_dir = tmp_path / "run"
    steps = ["trainer.max_steps=3", "trainer.val_check_interval=3", "data.max_val_examples=6", "validate_before_training=false"]
    arguments = tiny("objective=dpo", *TINY_PAIRS, *steps, f"data.cache_dir={cache_dir}")
    monkeypatch.setattr(sys, "argv", ["lomo-train", f"hydra.run.dir={run_dir}", *arguments])
    main()
    monkeypatch.setattr(sys, "argv", ["lomo-train", f"resume={run_dir}"])
    main()

    finished, resumed = ({k: v for k, v in metrics.items() if k.startswith("val/")} for metrics in reports)
    assert abs(finished["val/rewards/margins"]) > 1e-4, "training moved the policy away from its reference"
    assert "val/logps/chosen" in finished and resumed == pytest.approx(finished, rel=1e-5, abs=1e-6)


def test_the_gpu_experiment_trains_bf16_weights_with_stochastic_rounding(tmp_path):
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "experiment=llama2_7b_gpu"])
    assert cfg.trainer.precision == "bf16-true" and cfg.model.dtype == "bfloat16"
    assert cfg.method.optimizer.rounding == "stochastic"


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


def test_multirun_leaves_one_result_directory_per_job_and_goes_on_past_a_failed_one(tmp_path, cache_dir):
    sweep = tmp_path / "multirun"
    grid = ["-m", "method=lomo,adalomo", "method.optimizer.lr=0.01,-1", f"hydra.sweep.dir={sweep}"]
    code, output = finish(lomo_train(cache_dir, *grid, *tiny()))
    assert code == 0, output[-3000:]
    for job in ("0", "2"):  # lr=0.01
        assert (sweep / job / "model" / "config.json").is_file()
        assert (sweep / job / "csv" / "metrics.csv").is_file()
        assert not (sweep / job / "FAILED").exists()
    assert OmegaConf.load(sweep / "2" / "config.yaml").method.optimizer._target_ == "lomo_lightning.AdaLomo"
    for job in ("1", "3"):  # lr=-1: failed before training, said why
        assert "lr must be >= 0" in (sweep / job / "FAILED").read_text()
        assert not (sweep / job / "model").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=jsonl", "data.train_file={tmp}/missing.jsonl"], "instruction file not found"),
        (["data=jsonl", "data.train_file={tmp}/empty.jsonl"], "is empty"),
        (["data=jsonl", "data.train_file={tmp}/no_output.jsonl"], "has no 'output' field"),
        (["data.seq_len=64", "model.llama.max_position_embeddings=32"], "data.seq_len=64 is longer than the 32"),
        (["loss_chunk_tokens=0"], "loss_chunk_tokens=0: chunk_tokens must be >= 1"),
        (["selection=sft_sm3", "method=adalomo"], "selection: regrowth=sm3 .* rule is AdaLomo: use method=sm3"),
        (["selection=sft_ag", "selection.selector.selection_accumulation_steps=19"], "selection: selection.selector.selection_accumulation_steps=19: selection_accumulation_steps must be in"),
        (["objective=dpo"], "objective=dpo trains on preference pairs: use data=py_preference"),
        (TINY_PAIRS, "PyPreferenceDataModule holds preference pairs: train on them with objective=dpo"),
        (["objective=dpo", "objective.loss_type=kto", *TINY_PAIRS], "objective: loss_type must be one of sigmoid, ipo, hinge"),
        (["selection=hft", "selection.selector._target_=collections.OrderedDict", "~selection.selector.ratio",
          "~selection.selector.seed", "~selection.selector.include_embeddings", "~selection.selector.preset"],
         "selection: OrderedDict is not a selection: it needs config, apply"),
    ],
    ids=["missing-file", "empty-file", "missing-field", "seq-len", "loss-chunk", "sft-ma-rule", "sft-window", "dpo-data", "pairs-sft",
         "dpo-loss", "not-a-selection"],
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


BAD_INPUTS = {
    "negative-lr": (["method.optimizer.lr=-1e-3"], "method.optimizer.lr=-0.001: AdaLomo: lr must be >= 0"),
    "unknown-argument": (["+method.optimizer.lrr=1e-3"], "method.optimizer.lrr is not an argument of lomo_lightning.AdaLomo"),
    "unknown-key": (["method.optimizer.learning_rate=1"], "Could not override 'method.optimizer.learning_rate'"),
    "malformed-json": (
        ["data=jsonl", "data.train_file={tmp}/malformed.jsonl"],
        "data.train_file: .*malformed.jsonl cannot be read as json: line 2",
    ),
    "no-train-file": (["data=jsonl"], "data.train_file is required: pass data.train_file="),
    "no-model-path": (["model=hf"], "model.name_or_path is required: pass model.name_or_path="),
    "no-model-there": (["model=hf", "model.name_or_path={tmp}/nothing"], "model.name_or_path=.*/nothing: no model there"),
    "wandb-no-login": (["logger=wandb"], "logger.wandb: no W&B login here: .* logger.wandb.offline=true"),
    "accumulate-fused": (
        ["trainer.accumulate_grad_batches=4"], "accumulate_grad_batches=4 cannot work with a fused .* raise data.batch_size"
    ),
}


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_each_bad_input_is_one_line_exit_code_2_and_leaves_no_run_directory(
    tmp_path, cache_dir, monkeypatch, capsys, overrides, message
):
    (tmp_path / "malformed.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    monkeypatch.delenv("WANDB_MODE")  # and no W&B login: an empty home, no key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if "wandb" in sys.modules:  # a W&B session of an earlier test would keep its offline mode, as in a new process
        sys.modules["wandb"].teardown()
    monkeypatch.chdir(tmp_path)  # the run directory is Hydra's default: outputs/<date>/<time>
    arguments = tiny(f"data.cache_dir={cache_dir}", *(o.format(tmp=tmp_path) for o in overrides))
    monkeypatch.setattr(sys, "argv", ["lomo-train", *arguments])

    with pytest.raises(SystemExit) as exit:
        main()

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lomo-train:")]
    assert exit.value.code == 2
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not (tmp_path / "outputs").exists()


def test_the_console_script_exits_with_2_and_one_line_from_a_real_process(tmp_path, cache_dir):
    run_dir = tmp_path / "hydra"
    code, output = finish(lomo_train(cache_dir, f"hydra.run.dir={run_dir}", *tiny("method.optimizer.lr=-1")))
    assert code == 2
    assert "lomo-train: method.optimizer.lr=-1: AdaLomo: lr must be >= 0" in output and "Traceback" not in output
    assert not run_dir.exists()


def test_a_run_ends_with_a_validation_of_its_last_step(tmp_path, cache_dir):
    metrics, module = run(config(tmp_path, cache_dir, "trainer.max_steps=7", "trainer.val_check_interval=5"))

    rows = logged_rows(tmp_path)
    validated = [row for row in rows if row["val/loss"]]
    assert len(validated) == 3 and rows[-1] is validated[-1]  # before training, at step 5, after step 7
    assert float(validated[-1]["val/loss"]) == metrics["val/loss"]
    assert module.trainer.global_step == 7


# -- continuing a run ------------------------------------------------------------------------------

CONTINUED = ["trainer.max_steps=6", "trainer.val_check_interval=4", "callbacks.checkpoint.every_n_steps=2"]


def assert_stopped_then_resumed_equals_uninterrupted(tmp_path: Path, cache_dir: Path, *overrides: str) -> None:
    """Ctrl-C (SIGINT) at step 3 of 6, ``lomo-train resume=<run dir>``: the same model, logs and final val/loss."""
    uninterrupted, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
    interrupt = ["+callbacks.interrupt._target_=app_plugins.SignalAtStep", "+callbacks.interrupt.step=3"]
    runs = [
        lomo_train(cache_dir, f"hydra.run.dir={uninterrupted}", *tiny(*CONTINUED, *overrides)),
        lomo_train(cache_dir, f"hydra.run.dir={stopped}", *tiny(*CONTINUED, *overrides, *interrupt)),
    ]
    (code, output), (stop_code, stop_output) = (finish(process) for process in runs)
    assert code == 0, output[-3000:]
    assert stop_code == 128 + signal.SIGINT, stop_output[-3000:]
    assert f"Continue with: lomo-train resume={stopped}" in stop_output
    assert not (stopped / "model").exists()

    code, output = finish(lomo_train(cache_dir, f"resume={stopped}"))  # nothing else: the run's config is restored
    assert code == 0, output[-3000:]
    assert f"Continuing the run in {stopped} from {stopped / 'checkpoints' / 'last.ckpt'}" in output

    expected, resumed = (load_file(d / "model" / "model.safetensors") for d in (uninterrupted, stopped))
    assert expected.keys() == resumed.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    assert logged_rows(stopped) == logged_rows(uninterrupted)  # every step's loss, every validation, once


def test_ctrl_c_then_resume_through_lomo_train_equals_an_uninterrupted_run(tmp_path, cache_dir):
    assert_stopped_then_resumed_equals_uninterrupted(tmp_path, cache_dir)


@pytest.mark.distributed
def test_ctrl_c_then_resume_on_two_fsdp_ranks_equals_an_uninterrupted_run(tmp_path, cache_dir):
    """The signal reaches rank 0 only (``kill -INT``): both ranks save the step and stop together."""
    assert_stopped_then_resumed_equals_uninterrupted(tmp_path, cache_dir, "strategy=fsdp", "trainer.devices=2")


def test_killing_the_process_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, cache_dir):
    ready = tmp_path / "writing"
    blocking = f"trainer.plugins=[{{_target_:app_plugins.BlockingCheckpointIO,block_at:2,ready_file:{ready}}}]"
    steps = ["trainer.max_steps=6", "callbacks.checkpoint.every_n_steps=2", "callbacks.best_checkpoint=null"]
    process = lomo_train(cache_dir, f"hydra.run.dir={tmp_path}", *tiny(*steps, blocking))
    deadline = time.monotonic() + 300
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), finish(process)[1][-3000:]
    process.kill()  # SIGKILL, half-way through writing the step-4 checkpoint
    process.communicate()

    checkpoints = tmp_path / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (checkpoints / "step-000004.ckpt").exists()
    assert list(checkpoints.glob(".step-000004.ckpt.*.partial"))  # what the kill cut short stays out of the way


def test_a_run_that_crashes_is_marked_failed_and_continues_from_its_last_checkpoint(tmp_path, cache_dir, monkeypatch):
    run_dir = tmp_path / "run"
    crash = ["+callbacks.crash._target_=app_plugins.FailAtStep", "+callbacks.crash.step=3"]
    arguments = tiny("trainer.max_steps=4", "callbacks.checkpoint.every_n_steps=2", f"data.cache_dir={cache_dir}", *crash)
    monkeypatch.setattr(sys, "argv", ["lomo-train", f"hydra.run.dir={run_dir}", *arguments])
    with pytest.raises(RuntimeError, match="crash at step 3"):
        main()
    assert (run_dir / "FAILED").read_text() == "RuntimeError: crash at step 3\n"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2

    monkeypatch.setattr(sys, "argv", ["lomo-train", f"resume={run_dir}", "++callbacks.crash=null"])
    main()
    assert not (run_dir / "FAILED").exists() and (run_dir / "model" / "config.json").is_file()
    assert OmegaConf.load(run_dir / "config.yaml").callbacks.crash is None


def test_a_continued_run_restores_its_config_and_applies_only_the_values_typed_with_it(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    saved = config(run_dir, cache_dir, "method.optimizer.lr=0.01", "trainer.max_steps=5")
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 0}, run_dir / "checkpoints" / "last.ckpt")  # an intact (if empty) checkpoint
    OmegaConf.save(OmegaConf.to_container(saved, resolve=True), run_dir / "config.yaml")

    for resume in (f"resume={run_dir}", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"):
        typed = [resume, "trainer.max_steps=9", "+trainer.min_steps=2"]
        with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
            composed = compose("config", overrides=typed, return_hydra_config=True)
            groups = composed.hydra.runtime.choices.keys()
        assert composed.hydra.run.dir == str(run_dir)  # a continued run writes into its own directory
        continued, changes = continued_config(composed, typed, groups)

        assert continued.method.optimizer.lr == 0.01  # the run's value, not conf/'s 3e-2
        assert continued.trainer.max_steps == 9 and continued.trainer.min_steps == 2
        assert continued.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")
        assert changes == ["trainer.max_steps: 5 -> 9", "trainer.min_steps: (absent) -> 2"]

    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        composed = compose("config", overrides=[f"resume={run_dir}", "method=lomo"], return_hydra_config=True)
    with pytest.raises(ConfigError, match="method=lomo: a continued run keeps the config groups it started with"):
        continued_config(composed, [f"resume={run_dir}", "method=lomo"], composed.hydra.runtime.choices.keys())


def test_an_optuna_sweep_of_short_trials_gets_a_number_from_every_trial(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    arguments = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"]
    # 3 steps, validation every 2: without a validation at the end the trials would have no val/loss to return
    code, output = finish(lomo_train(cache_dir, *arguments, *tiny("trainer.max_steps=3")))
    assert code == 0, output[-3000:]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert math.isfinite(results.best_value)


# -- every model group trains in train mode ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory, cache_dir) -> Path:
    """A tiny Llama and the stdlib tokenizer, saved as ``from_pretrained`` reads them (``model=hf``'s input)."""
    directory = tmp_path_factory.mktemp("saved_model")
    cfg = config(directory, cache_dir)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    instantiate(cfg.model, tokenizer=datamodule.tokenizer, seq_len=cfg.data.seq_len).save_pretrained(directory)
    datamodule.tokenizer.save_pretrained(directory)
    return directory


MODEL_GROUPS = {
    "tiny": [],
    "small": ["model=small", "model.llama.num_hidden_layers=1"],  # the preset, one block of it
    "hf": ["model=hf", "model.name_or_path={saved}", "model.dtype=float32"],
}


@pytest.mark.parametrize("overrides", MODEL_GROUPS.values(), ids=MODEL_GROUPS.keys())
def test_every_model_group_trains_in_train_mode(tmp_path, cache_dir, saved_tiny_model, overrides):
    """No module in eval mode at the first step (model=smollm2: tests/test_real_model.py), checkpointing as configured."""
    probe = "+callbacks.modes._target_=app_plugins.RecordModesAtFirstStep"
    overrides = [override.format(saved=saved_tiny_model) for override in overrides]
    _, module = run(config(tmp_path, cache_dir, "trainer.max_steps=1", "validate_before_training=false", probe, *overrides))

    (modes,) = (callback for callback in module.trainer.callbacks if isinstance(callback, RecordModesAtFirstStep))
    assert modes.in_eval_mode == []
    assert modes.checkpointing == ("model=hf" in overrides)  # model=hf checkpoints by default, the presets do not


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters aside), distinct storages counted once."""
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=tokens, labels=tokens).loss.backward()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def test_gradient_checkpointing_of_model_hf_saves_fewer_activations(tmp_path, cache_dir, saved_tiny_model):
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    saved = {}
    for checkpointing in (False, True):
        model_path = f"model.name_or_path={saved_tiny_model}"
        cfg = config(tmp_path, cache_dir, "model=hf", model_path, "model.dtype=float32", f"model.gradient_checkpointing={checkpointing}")
        model = instantiate(cfg.model, tokenizer=instantiate(cfg.data).tokenizer, seq_len=cfg.data.seq_len)
        saved[checkpointing] = saved_activation_bytes(model, tokens)
    assert saved[True] < 0.5 * saved[False], saved


def test_trust_remote_code_is_off_unless_asked_for(tmp_path):
    for model in ("tiny", "small", "llama2_7b", "hf"):
        assert config(tmp_path, tmp_path, f"model={model}").model.trust_remote_code is False


@pytest.mark.distributed
def test_sparse_fine_tuning_on_two_fsdp_ranks_saves_a_model_its_delta_rebuilds(tmp_path, cache_dir):
    """The app under strategy=fsdp: shards trained, then one consolidated model and one sparse delta."""
    from lomo_lightning.data import load_tokenizer
    from lomo_lightning.selection import apply_sparse_delta

    overrides = [  # SpIEL-MA with SM3; every entry replaced after step 1
        "selection=sft_sm3",
        "selection.selector.reselection_steps=3",
        "selection.selector.selection_accumulation_steps=1",
        "strategy=fsdp",
        "trainer.devices=2",
    ]
    run, workdir = tmp_path / "run", tmp_path / "workdir"
    workdir.mkdir()
    command = [sys.executable, "-m", "lomo_lightning.train", f"output_dir={run}", f"data.cache_dir={cache_dir}"]
    done = subprocess.run(  # in workdir: Hydra's outputs/<date>/<time> and rank 1's log land there, not in the checkout
        command + tiny(*overrides), cwd=workdir, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.trainer.devices == 2 and cfg.strategy.fused._target_.endswith("LomoFSDPStrategy")

    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    base = instantiate(cfg.model, tokenizer=load_tokenizer(str(run / "model")), seq_len=cfg.data.seq_len)
    untouched = {name: value.clone() for name, value in base.state_dict().items()}
    apply_sparse_delta(base, run / "model" / "sparse_delta.safetensors")
    rebuilt = base.state_dict()
    assert max((trained.state_dict()[name] - value).abs().max().item() for name, value in untouched.items()) > 1e-5
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(rebuilt[name], value, rtol=0, atol=1e-6, msg=name)
