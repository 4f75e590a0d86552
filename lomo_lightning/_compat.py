"""Every private API of an upstream library that the package relies on, in one place.

Each function or name here reaches into one private object of torch, Lightning, omegaconf or datasets,
says which, and was checked against torch 2.13, lightning 2.6, omegaconf 2.3 and datasets 4;
``tests/test_compat.py`` exercises every one of them against the installed releases, so that an upstream
change fails there, by name, and not deep inside a training run. The upstream imports are made at the
call: this module sits below :mod:`lomo_lightning.layout`, which ``AdaLomo`` imports with torch alone,
so it must not load Lightning, omegaconf or datasets by being imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.fabric.strategies import _StrategyRegistry as StrategyRegistry  # noqa: F401 - for annotations
    from torch import Tensor
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim import Optimizer

# lightning.fabric.utilities.types._PATH: what Lightning's checkpoint IO methods accept as a path
PathLike = str | Path

# -- torch ------------------------------------------------------------------------------------------


def local_shard_offsets(tensor: DTensor) -> tuple[int, ...]:
    """The global index of a ``DTensor`` shard's first element along each dimension.

    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(offsets)


def mark_optimizer_stepped(optimizer: Optimizer) -> None:
    """Record what a wrapped ``optimizer.step()`` records, so LR schedulers do not warn of a skipped step.

    ``torch.optim.Optimizer._opt_called`` (read by ``torch.optim.lr_scheduler.LRScheduler``).
    """
    optimizer._opt_called = True  # type: ignore[attr-defined]


def rearm_ddp_reducer(ddp_model: DistributedDataParallel) -> None:
    """Let a DDP model run a second backward for the same forward (the fused engine's norm pass).

    ``DistributedDataParallel.reducer._rebuild_buckets``. On the first iteration DDP has recorded the
    ready order to rebuild its buckets by: rebuild them now, before the second pass records the same
    parameters again; then ``reducer.prepare_for_backward`` re-arms it.
    """
    ddp_model.reducer._rebuild_buckets()
    ddp_model.reducer.prepare_for_backward([])


def csr_row_pointers(rows: Tensor, num_rows: int, out_int32: bool) -> Tensor:
    """The CSR row pointers of sorted COO row indices. ``torch._convert_indices_from_coo_to_csr``."""
    import torch

    return torch._convert_indices_from_coo_to_csr(rows, num_rows, out_int32=out_int32)


def version_counter(tensor: Tensor) -> int:
    """How many times ``tensor`` was changed in place. ``Tensor._version``."""
    return tensor._version


def grad_scaler_scale(scaler: Any) -> float:
    """A ``torch.amp.GradScaler``'s current scale, also before its first step.

    ``GradScaler._scale`` (``None`` until the first ``scale()``) and ``GradScaler._init_scale``.
    """
    return float(scaler.get_scale()) if scaler._scale is not None else float(scaler._init_scale)


# -- Lightning --------------------------------------------------------------------------------------


def trainer_of(module: Any) -> Any:
    """The ``Trainer`` a ``LightningModule`` is attached to, or ``None``; ``LightningModule._trainer``
    (the public ``trainer`` property raises when there is none)."""
    return module._trainer


def set_device_mesh(module: Any, mesh: Any) -> None:
    """Give a ``LightningModule`` the device mesh that ``ModelParallelStrategy`` would: ``LightningModule._device_mesh``."""
    module._device_mesh = mesh


def materialize_distributed_module(module: Any, device: Any) -> None:
    """Materialize a meta-device module after ``fully_shard``. ``lightning.fabric.utilities.init._materialize_distributed_module``."""
    from lightning.fabric.utilities.init import _materialize_distributed_module

    _materialize_distributed_module(module, device)


def optimizers_to_device(optimizers: Any, device: Any) -> None:
    """Move the optimizers' state to ``device``. ``lightning.fabric.utilities.optimizer._optimizers_to_device``."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


def is_local_path(path: PathLike) -> bool:
    """Whether ``path`` is on the local file system. ``lightning.fabric.utilities.cloud_io._is_local_file_protocol``."""
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

    return bool(_is_local_file_protocol(path))


# -- omegaconf and datasets -------------------------------------------------------------------------


def full_key(node: Any) -> str:
    """The dotted key of an omegaconf node in its root config (``""`` at the root). ``Node._get_full_key``."""
    return str(node._get_full_key(None))


def dataset_fingerprint(dataset: Any) -> str:
    """The fingerprint ``datasets`` keys its caches on. ``datasets.Dataset._fingerprint``."""
    return str(dataset._fingerprint)
