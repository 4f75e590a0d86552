"""Checkpoints on a clock and on exit: the last k kept, last.ckpt on the newest, signals stop between steps, files whole."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from app_plugins import SignalAtStep
from torch.utils.data import TensorDataset

from lomo_lightning.checkpointing import AtomicCheckpointIO, PeriodicCheckpoint, Preempted, publish_directory
from lomo_lightning.data import ResumableDataLoader


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.layer(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, checkpoint: PeriodicCheckpoint, *callbacks: pl.Callback, max_steps: int = 7) -> pl.Trainer:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=generator), torch.randn(32, 1, generator=generator))
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=[checkpoint, *callbacks],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(), ResumableDataLoader(data, batch_size=2, seed=0))
    return trainer


def saved_steps(directory: Path) -> list[int]:
    return sorted(torch.load(path, weights_only=True)["global_step"] for path in directory.glob("step-*.ckpt"))


def last_step(directory: Path) -> int:
    return torch.load(directory / "last.ckpt", weights_only=True)["global_step"]


def test_every_n_steps_and_at_the_end_keeping_the_last_k_with_last_ckpt_on_the_newest(tmp_path):
    fit(tmp_path, PeriodicCheckpoint(tmp_path / "ckpt", every_n_steps=2, keep_last=2))

    assert saved_steps(tmp_path / "ckpt") == [6, 7]  # saved at 2, 4, 6 and at the end
    assert (tmp_path / "ckpt" / "last.ckpt").resolve() == (tmp_path / "ckpt" / "step-000007.ckpt").resolve()
    assert last_step(tmp_path / "ckpt") == 7
    assert not list((tmp_path / "ckpt").glob(".*"))  # no temporary file left behind


def test_every_few_minutes(tmp_path):
    fit(tmp_path, PeriodicCheckpoint(tmp_path / "ckpt", every_minutes=1e-9, keep_last=3))  # a step takes longer

    assert saved_steps(tmp_path / "ckpt") == [5, 6, 7]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_it_and_stops(tmp_path, signum):
    handler = signal.getsignal(signum)
    with pytest.raises(Preempted) as stopped:
        fit(tmp_path, PeriodicCheckpoint(tmp_path / "ckpt", every_n_steps=100), SignalAtStep(3, signum))

    assert (stopped.value.signum, stopped.value.step) == (signum, 3)
    assert saved_steps(tmp_path / "ckpt") == [3] and last_step(tmp_path / "ckpt") == 3
    assert signal.getsignal(signum) is handler  # the handler before training is back


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    class DoubleCtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)

    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C while it shuts down
    try:
        with pytest.raises(SystemExit):
            fit(tmp_path, PeriodicCheckpoint(tmp_path / "ckpt", every_n_steps=2), DoubleCtrlC())
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert saved_steps(tmp_path / "ckpt") == [2]


def test_a_failed_write_leaves_the_previous_file_whole_and_no_temporary_file(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    with pytest.raises(Exception):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "unpicklable": lambda: None}, path)

    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_directory_is_replaced_whole(tmp_path):
    target, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    target.mkdir()
    (target / "shard0").write_text("old")
    staging.mkdir()
    (staging / "shard0").write_text("new")

    publish_directory(staging, target)

    assert (target / "shard0").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
