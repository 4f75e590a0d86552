"""Where a tensor's elements live: the torch-only leaf that every layer of the package may use.

Under FSDP2 a parameter is a ``DTensor`` sharded on dim 0 over a 1-D mesh. Elementwise work runs on its
local shard (:func:`local_tensor`); a statistic that spans the whole tensor (a norm, a column mean, an
RMS) is completed over its shard group (:class:`ShardLayout`); stochastic rounding needs the position of
the shard's first element in the whole tensor (:func:`flat_offset`). A 1-D parameter may also stand for
entries of a larger matrix (:data:`MATRIX_ENTRIES`, sparse fine-tuning's values). Nothing here imports
another module of the package but :mod:`lomo_lightning._compat`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from lomo_lightning._compat import local_shard_offsets

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

# The attribute of a 1-D parameter that holds entries of a matrix: a callable returning their current flat
# indices and the matrix's shape (set by the sparse delta layer, read by SM3).
MATRIX_ENTRIES = "matrix_entries"


def matrix_entries(param: Tensor) -> tuple[Tensor, tuple[int, int]] | None:
    """``(flat indices, matrix shape)`` when ``param`` holds entries of a larger matrix, else ``None``.

    A 1-D parameter that stands for ``k`` entries of an ``(rows, cols)`` matrix (the ``values`` of
    :class:`~lomo_lightning.selection.sft.SparseDeltaLinear`) carries an attribute ``matrix_entries``:
    a callable returning its current flat indices (which change when entries are regrown) and the shape.
    """
    locate: Callable[[], tuple[Tensor, tuple[int, int]]] | None = getattr(param, MATRIX_ENTRIES, None)
    return None if locate is None else locate()


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (FSDP2), or the tensor itself: elementwise work needs no DTensor dispatch."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_distributed(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (elementwise work then runs on :func:`local_tensor`)."""
    return hasattr(tensor, "placements")


def shard_group(tensor: Tensor) -> Any:
    """The process group a ``DTensor`` is sharded over on dim 0 (FSDP2); ``None`` when whole or replicated.

    Raises ``NotImplementedError`` for placements the per-shard code here cannot complete exactly
    (several mesh dimensions, sharding on another dimension).
    """
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh = cast("DTensor", tensor).device_mesh  # it has placements: a DTensor
    if mesh.ndim != 1 or not all(isinstance(p, (Shard, Replicate)) for p in placements):
        raise NotImplementedError(f"lomo_lightning supports 1-D meshes with Shard(0) or Replicate placement, got {placements}.")
    if not isinstance(placements[0], Shard):
        return None
    if placements[0].dim != 0:
        raise NotImplementedError(f"lomo_lightning needs tensors sharded on dim 0 (FSDP2's default), got {placements}.")
    return mesh.get_group()


def flat_offset(tensor: Tensor) -> int:
    """The position of a ``DTensor`` shard's first element in the flattened whole tensor (0 when whole)."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return 0
    offsets = local_shard_offsets(cast("DTensor", tensor))
    strides = [math.prod(tensor.shape[d + 1 :]) for d in range(tensor.dim())]
    return sum(o * s for o, s in zip(offsets, strides))


@dataclass(frozen=True)
class ShardLayout:
    """Where statistics that span a whole tensor are completed.

    A plain tensor is whole (``group is None``). An FSDP2 parameter is a ``DTensor`` sharded on dim 0:
    its local rows are complete rows, so row statistics stay local. The column statistics are sharded
    too, by chunks of columns (``torch.chunk``, as ``DTensor`` places ``Shard(0)``); the column sums,
    the chunks and the scalar sums behind a mean or an RMS travel in one all-reduce per tensor.
    """

    group: Any = None
    rows: int = 0
    numel: int = 0

    @staticmethod
    def of(param: Tensor) -> ShardLayout:
        return ShardLayout(shard_group(param), param.shape[0] if param.dim() else 1, param.numel())

    @staticmethod
    def like_rows(local_state: Tensor, param: Tensor) -> Tensor:
        """Per-row state of ``param``, placed like its rows: a ``DTensor`` for a ``DTensor`` parameter.

        Distributed checkpoints then save each rank's rows once and can reshard them; a plain tensor
        would be taken for a replica and saved from rank 0 only.
        """
        placements = getattr(param, "placements", None)
        if placements is None:
            return local_state
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local_state,
            cast(DTensor, param).device_mesh,
            placements,
            run_check=False,
            shape=torch.Size((param.shape[0],)),
            stride=(1,),
        )

    def columns(self, cols: int) -> slice:
        """The chunk of ``cols`` columns whose statistics this rank keeps (all of them when whole)."""
        if self.group is None:
            return slice(0, cols)
        chunk = math.ceil(cols / dist.get_world_size(self.group))
        start = min(dist.get_rank(self.group) * chunk, cols)
        return slice(start, min(start + chunk, cols))

    def column_chunk(self, whole_state: Tensor, param: Tensor) -> Tensor:
        """Per-column state of ``param``: whole for a plain tensor, this rank's chunk as a ``DTensor`` on shards."""
        if self.group is None:
            return whole_state
        from torch.distributed.tensor import DTensor, Shard

        cols = whole_state.numel()
        return DTensor.from_local(
            whole_state[self.columns(cols)].clone(),
            cast(DTensor, param).device_mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size((cols,)),
            stride=(1,),
        )

    def sum_(self, tensor: Tensor) -> Tensor:
        """Complete a partial sum over the shard group, in place."""
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor
