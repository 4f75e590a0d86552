"""Checkpoints that survive being killed: on a clock, on SIGINT/SIGTERM, written atomically, the last k kept.

- :class:`AtomicCheckpointIO` writes a checkpoint file next to its target, fsyncs it and renames it into
  place, so the target is always either the previous complete file or the new complete file.
  :func:`publish_directory` does the same for a checkpoint directory (FSDP's one shard file per rank).
- :class:`PeriodicCheckpoint` is Lightning's ``ModelCheckpoint`` with its own triggers: every N steps
  and/or M minutes, at the end of training, and when the process receives SIGINT or SIGTERM (a Ctrl-C,
  a preempted SLURM job). It keeps the newest ``keep_last`` step checkpoints and points ``last.ckpt``
  at the newest one with a symbolic link that is itself replaced atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lomo_lightning._compat import PathLike, is_local_path
from lomo_lightning.files import atomic_file, remove_entry, write_atomically

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Preempted(Exception):
    """Training stopped at a step boundary on a signal, after that step was checkpointed."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {self.signal_name} after step {step}; checkpoint {checkpoint or 'none'}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def fsync_path(path: Path) -> None:
    """Flush a file, or every file in a directory and the directory itself, to stable storage."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                fsync_path(child)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose files are complete or absent, never half-written, even after a SIGKILL.

    ``torch.save`` streams into a temporary file in the target's directory (so the rename stays on one
    file system), which is fsynced and renamed over the target; then the directory is fsynced so the
    rename survives a power cut. Unlike Lightning's default it never holds a second, in-memory copy of
    the checkpoint. Paths on remote file systems (``s3://``...) are left to ``TorchCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as file:  # never through a link planted at the temporary name
            self.write(checkpoint, file)
        fsync_path(path.parent)

    def write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        """Serialize ``checkpoint`` into the open temporary ``file``."""
        torch.save(checkpoint, file)


def staging_path(path: PathLike) -> Path:
    """Where a checkpoint directory is written before :func:`publish_directory` moves it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def publish_directory(staging: Path, path: Path) -> None:
    """Move the fully written checkpoint directory ``staging`` to ``path``, replacing what was there.

    Renaming a directory is atomic, but not over a non-empty one: an old ``path`` is first renamed aside,
    so at every moment either the old or the new checkpoint is whole (under ``path`` or beside it).
    """
    fsync_path(staging)
    aside = path.with_name(f".{path.name}.replaced")
    remove_entry(aside)
    if path.is_dir() and not path.is_symlink():
        os.replace(path, aside)
    else:
        remove_entry(path)  # a link is removed, never followed
    os.replace(staging, path)
    fsync_path(path.parent)
    remove_entry(aside)


def link_atomically(target: PathLike, link: PathLike) -> None:
    """Make ``link`` a relative symbolic link to ``target``, replacing what was there in one rename."""
    target, link = Path(target), Path(link)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # a full checkpoint directory written here by save_last=True
    temporary = link.with_name(f".{link.name}.{os.getpid()}.link")
    remove_entry(temporary)
    os.symlink(os.path.relpath(target, link.parent), temporary)
    os.replace(temporary, link)
    fsync_path(link.parent)


METADATA_FILE = ".metadata"
METADATA_DIGEST_FILE = ".metadata.sha256"


class UntrustedCheckpoint(ValueError):
    """A checkpoint that loading could turn into code: refused before anything of it is read."""


def write_metadata_digest(directory: Path) -> None:
    """Write the SHA-256 of a distributed checkpoint's ``.metadata`` beside it, as text (not pickle)."""
    digest = hashlib.sha256((directory / METADATA_FILE).read_bytes()).hexdigest()
    write_atomically(directory / METADATA_DIGEST_FILE, f"{digest}  {METADATA_FILE}\n")


def metadata_problem(directory: Path) -> str | None:
    """Why a distributed checkpoint directory's ``.metadata`` cannot be trusted (``None``: it is the one written at save)."""
    metadata, recorded = directory / METADATA_FILE, directory / METADATA_DIGEST_FILE
    if not metadata.is_file():
        return f"no {METADATA_FILE}"
    if not recorded.is_file():
        return f"no {METADATA_DIGEST_FILE} (the digest written when it was saved)"
    expected = recorded.read_text().split()[:1]
    if expected != [hashlib.sha256(metadata.read_bytes()).hexdigest()]:
        return f"its {METADATA_FILE} is not the one saved (the digest in {METADATA_DIGEST_FILE} differs)"
    return None


def check_metadata_digest(directory: Path) -> None:
    """Refuse a distributed checkpoint whose ``.metadata`` changed since it was saved.

    torch's distributed-checkpoint reader unpickles ``.metadata`` with plain ``pickle.load``
    (``weights_only`` does not apply), so a planted one would run code: check it before loading.
    """
    problem = metadata_problem(directory)
    if problem is not None:
        raise UntrustedCheckpoint(
            f"checkpoint {directory}: {problem}; refused: torch reads {METADATA_FILE} with pickle, which can run code"
        )


def _inside(path: str, directory: Path) -> bool:
    resolved = Path(path).resolve()
    return resolved == directory or directory in resolved.parents


class ContainedCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that deletes and links only inside its ``dirpath``, and follows a moved run.

    The paths a checkpoint's callback state lists (``best_k_models``, ``kth_best_model_path``,
    ``last_model_path``...) are what pruning deletes later. Restored from a checkpoint, each is resolved
    (symbolic links and ``..`` included; Lightning compares ``absolute()`` paths) and kept only if it lies
    inside ``dirpath``; anything else is dropped with a warning, and no removal ever leaves ``dirpath``.
    Paths under the checkpoint's own former ``dirpath`` (a run directory moved or copied) are rebased
    onto the current one, so a continued copy prunes its own files and never the original's.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.dirpath is None:
            super().load_state_dict(state_dict)
            return
        state = self._rebased(dict(state_dict), str(state_dict.get("dirpath") or self.dirpath), str(self.dirpath))
        super().load_state_dict(self._contained(state, Path(self.dirpath).resolve()))

    @staticmethod
    def _rebased(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
        def rebase(path: Any) -> Any:
            if isinstance(path, str) and old != new and path.startswith(old.rstrip(os.sep) + os.sep):
                return new.rstrip(os.sep) + path[len(old.rstrip(os.sep)) :]
            return path

        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = rebase(state[key])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {rebase(path): value for path, value in state["best_k_models"].items()}
        state["dirpath"] = new
        return state

    def _contained(self, state: dict[str, Any], dirpath: Path) -> dict[str, Any]:
        dropped = []
        models = state.get("best_k_models")
        if isinstance(models, dict):
            kept = {path: value for path, value in models.items() if isinstance(path, str) and _inside(path, dirpath)}
            dropped += [str(path) for path in models if path not in kept]
            state["best_k_models"] = kept
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            path = state.get(key)
            if path and not (isinstance(path, str) and _inside(path, dirpath)):
                dropped.append(str(path))
                state[key] = ""
        if dropped:
            log.warning(
                "The checkpoint's callback state names paths outside %s (%s): dropped, nothing there will be deleted",
                dirpath, ", ".join(sorted(set(dropped))),
            )
            remaining: dict[str, Any] = state.get("best_k_models") or {}
            if remaining and not state.get("kth_best_model_path"):  # the worst kept one is the next to go
                ranked = sorted(remaining, key=lambda path: float(remaining[path]), reverse=self.mode == "min")
                state["kth_best_model_path"], state["kth_value"] = ranked[0], remaining[ranked[0]]
        return state

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self.dirpath is not None and is_local_path(filepath) and not _inside(filepath, Path(self.dirpath).resolve()):
            log.warning("Not removing %s: it is outside the checkpoint directory %s", filepath, self.dirpath)
            return
        super()._remove_checkpoint(trainer, filepath)


class PeriodicCheckpoint(ContainedCheckpoint):
    """Save the training state every N steps and/or M minutes, at the end, and on SIGINT/SIGTERM; keep the last k.

    Files go to ``dirpath``: ``step-000070.ckpt`` for step 70, and ``last.ckpt``, a symbolic link to the
    newest. A checkpoint is only ever taken between steps: with fused updates, parameters are changed
    one by one inside backward, so the middle of a step is no state to resume from. On the first SIGINT
    or SIGTERM the step in flight finishes, is checkpointed and logged, and :class:`Preempted` stops
    training before the next batch or validation; a second Ctrl-C stops at once, without a checkpoint.
    With several processes every decision is agreed by all of them (one tiny all-reduce per step), so a
    signal that reaches one rank stops all of them at the same step.

    Args:
        dirpath: the directory of the checkpoints.
        every_n_steps: save every N optimizer steps (``None``: not by steps).
        every_minutes: save when this many minutes have passed since the last save (``None``: not by time).
        keep_last: how many step checkpoints to keep (the newest ones).
    """

    def __init__(
        self,
        dirpath: PathLike,
        every_n_steps: int | None = None,
        every_minutes: float | None = None,
        keep_last: int = 2,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"every_minutes must be > 0 or None, got {every_minutes}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        # "step" is always among the monitored candidates: top-k by step in "max" mode keeps the newest k
        super().__init__(
            dirpath=dirpath,
            filename="step-{step:06d}",
            monitor="step",
            mode="max",
            save_top_k=keep_last,
            save_last="link",
            auto_insert_metric_name=False,
            every_n_train_steps=0,  # the triggers are this class's own, in on_train_batch_end
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self._last_save_time = time.monotonic()
        self._last_seen_step = -1
        self._received: int | None = None  # the signal this process got
        self._stopping = 0  # the signal all processes agreed to stop on, once the checkpoint is saved
        self._previous_handlers: dict[int, Any] = {}
        self._stale: list[str] = []

    # -- triggers ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save_time = time.monotonic()
        self._last_seen_step = trainer.global_step
        self._install_signal_handlers()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_seen_step:  # accumulating gradients: no step was completed
            return
        self._last_seen_step = step
        by_steps = self.every_n_steps is not None and step % self.every_n_steps == 0
        by_time = self.every_minutes is not None and time.monotonic() - self._last_save_time >= 60 * self.every_minutes
        due, signum = self._agree(trainer, by_steps or by_time, self._received or 0)
        if due or signum:
            self.save(trainer)
        if signum:
            self._stopping = signum

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: pl.Trainer) -> None:
        # Stopping here rather than in on_train_batch_end lets Lightning log the saved step's metrics first.
        if self._stopping:
            raise Preempted(self._stopping, trainer.global_step, self.last_model_path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_signal_handlers()
        self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_signal_handlers()

    @staticmethod
    def _agree(trainer: pl.Trainer, due: bool, signum: int) -> tuple[bool, int]:
        """Each decision as taken by any process, so that all ranks save (a collective under FSDP) and stop together."""
        if trainer.world_size == 1:
            return due, signum
        flags = torch.tensor([float(due), float(signum)], device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="max")
        return bool(flags[0]), int(flags[1])

    # -- saving ------------------------------------------------------------------------------------

    def save(self, trainer: pl.Trainer) -> None:
        """Save the state after the current step (once per step), point ``last.ckpt`` at it, drop the oldest."""
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        for path in self._stale:  # only now that last.ckpt no longer points at them
            super()._remove_checkpoint(trainer, path)
        self._stale = []
        self._last_save_time = time.monotonic()

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._stale.append(filepath)

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero:
            link_atomically(filepath, linkpath)
        trainer.strategy.barrier()

    # -- signals -----------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        self._received, self._stopping = None, 0
        if threading.current_thread() is not threading.main_thread():
            return  # Python lets only the main thread handle signals
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._received is not None and signum == signal.SIGINT:
            self._restore_signal_handlers()
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._received = signum
        log.warning(
            "Received %s: finishing this step, saving a checkpoint, then stopping (Ctrl-C again: stop at once)",
            signal.Signals(signum).name,
        )


__all__ = [
    "AtomicCheckpointIO",
    "ContainedCheckpoint",
    "UntrustedCheckpoint",
    "check_metadata_digest",
    "metadata_problem",
    "write_metadata_digest",
    "PeriodicCheckpoint",
    "Preempted",
    "link_atomically",
    "publish_directory",
    "staging_path",
]
