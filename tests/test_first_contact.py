"""The edges a user touches first: a misspelled key gets "did you mean", settings that do nothing get a warning."""

from __future__ import annotations

import sys

import pytest
from hydra import compose, initialize_config_module

from lomo_lightning.preflight import settings_that_do_nothing
from lomo_lightning.train import main


def composed(*overrides: str):
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        return compose("config", overrides=["output_dir=unused", *overrides])


MISSPELLED = {
    "method.optimizer.lrr=1": "method.optimizer.lr",
    "trainer.max_step=3": "trainer.max_steps",
    "data.batchsize=3": "data.batch_size",
}


@pytest.mark.parametrize(("override", "nearest"), MISSPELLED.items(), ids=MISSPELLED.keys())
def test_a_misspelled_key_gets_the_nearest_key_of_its_node(override, nearest, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lomo-train", override])
    with pytest.raises(SystemExit) as exit:
        main()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lomo-train:")]
    assert exit.value.code == 2
    assert line.startswith(f"lomo-train: {override.split('=')[0]} is not a key of this config: did you mean {nearest}?")
    assert not (tmp_path / "outputs").exists()


def test_a_key_like_no_other_keeps_hydras_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lomo-train", "method.optimizer.zzz=1"])
    with pytest.raises(SystemExit):
        main()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lomo-train:")]
    assert line == "lomo-train: Could not override 'method.optimizer.zzz'. To append to your config use +method.optimizer.zzz=1"


def test_a_learning_rate_of_zero_is_warned_about():
    (warning,) = settings_that_do_nothing(composed("method.optimizer.lr=0"))
    assert warning.startswith("method.optimizer.lr=0: no parameter will change in the 100 steps of this run")
    assert settings_that_do_nothing(composed("method.optimizer.lr=1e-3")) == []


@pytest.mark.parametrize("method", ["adalomo", "adamw"])
def test_fsdp_on_one_process_is_warned_about_and_on_two_it_is_not(method):
    (warning,) = settings_that_do_nothing(composed(f"method={method}", "strategy=fsdp"))
    assert warning.startswith("strategy=fsdp on one process (trainer.devices=1): there is nothing to shard over")
    assert settings_that_do_nothing(composed(f"method={method}", "strategy=fsdp", "trainer.devices=2")) == []
    assert settings_that_do_nothing(composed(f"method={method}", "strategy=fsdp", "+trainer.num_nodes=2")) == []
    assert settings_that_do_nothing(composed(f"method={method}", "strategy=ddp")) == []


NOISE = """
import logging, sys, tempfile
import torch
{first}
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities._pytree import _tree_flatten

logging.basicConfig(level=logging.INFO, stream=sys.stdout)
pl.Trainer(accelerator="cpu", logger=CSVLogger(tempfile.mkdtemp()), enable_checkpointing=False, limit_val_batches=None)
_tree_flatten(torch.tensor(1.0))
logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
logging.getLogger("alembic.runtime.migration").info("Will assume non-transactional DDL.")
logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
logging.getLogger("torchao").warning("torchao says something that matters")
"""
NOISY_LINES = ["💡 Tip: For seamless cloud logging", "LeafSpec", "Context impl SQLiteImpl", "Will assume non-transactional", "Failed to load"]


@pytest.mark.parametrize("app", [True, False], ids=["lomo-train", "lightning-alone"])
def test_third_party_noise_is_silenced_by_name_and_nothing_else(app):
    import subprocess

    code = NOISE.format(first="import lomo_lightning.train" if app else "")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "GPU available" in output and "torchao says something that matters" in output  # the same loggers' other lines
    shown = [noise for noise in NOISY_LINES if noise in output]
    assert shown == ([] if app else NOISY_LINES), output[-3000:]
