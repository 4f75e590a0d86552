"""Where the entries of a weight live, so that a selection addressing them by flat index works sharded.

A plain tensor holds all its entries. An FSDP2 parameter (a ``DTensor`` on ``Shard(0)`` over a 1-D mesh)
holds a block of whole rows on each rank: the flat indices ``[start, stop)``. A selection keeps its index
sets *global* (the same on every rank, the same as on one process); the layout reads and writes the
entries through the local block and completes what spans ranks with one collective. Every method that
communicates is marked so: every rank of the shard group must call it, in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from lomo_lightning.optim.base import local_tensor, shard_group


class WeightLayout:
    """The block of a weight's flat entries held here: all of them, or ``[start, stop)`` of an FSDP2 shard."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.rows = weight.shape[0] if weight.dim() else 1
        self.row_numel = weight.numel() // max(self.rows, 1)
        self.row_start, self.row_stop = 0, self.rows
        self.group = shard_group(weight)
        if self.group is not None:
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
            self.row_start = offset[0]
            self.row_stop = offset[0] + (local_shape[0] if local_shape else 1)
        self.start, self.stop = self.row_start * self.row_numel, self.row_stop * self.row_numel

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def local_flat(self, tensor: Tensor) -> Tensor:
        """The entries held here, flat (a view): ``tensor`` is the weight, its gradient, or alike."""
        return local_tensor(tensor).reshape(-1)

    def local_rows(self, tensor: Tensor) -> Tensor:
        """The rows held here as a ``(local rows, row numel)`` matrix (a view)."""
        return local_tensor(tensor).reshape(self.row_stop - self.row_start, self.row_numel)

    def locate(self, indices: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(positions, local)``: which of the global flat ``indices`` are held here, and where in the block.

        ``positions`` is ``None`` when every index is held here (then ``local`` is ``indices``).
        """
        if not self.sharded:
            return None, indices
        positions = ((indices >= self.start) & (indices < self.stop)).nonzero().squeeze(1)
        return positions, indices[positions] - self.start

    def read_local(self, tensor: Tensor, indices: Tensor) -> Tensor:
        """The entries of ``tensor`` at the global ``indices`` held here (no communication)."""
        return self.local_flat(tensor)[self.locate(indices)[1]]

    def read(self, tensor: Tensor, indices: Tensor) -> Tensor:
        """The entries of ``tensor`` at the global flat ``indices``, complete on every rank (collective), in fp32."""
        flat = self.local_flat(tensor)
        positions, local = self.locate(indices)
        if positions is None:
            return flat[local].float()
        out = torch.zeros(indices.numel(), dtype=torch.float32, device=flat.device)
        out[positions] = flat[local].float()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)  # each entry is held by exactly one rank
        return out

    def write(self, tensor: Tensor, indices: Tensor, values: Tensor) -> None:
        """``tensor[indices] = values`` for the entries held here (``values`` complete, aligned with ``indices``)."""
        flat = self.local_flat(tensor)
        positions, local = self.locate(indices)
        if positions is not None:
            values = values[positions]
        flat.index_copy_(0, local, values.to(device=flat.device, dtype=flat.dtype))

    def all_reduce_max_(self, tensor: Tensor) -> Tensor:
        """Elementwise maximum over the shard group, in place (collective)."""
        if self.sharded:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def top_indices(self, scores: Tensor, count: int) -> Tensor:
        """Global flat indices of the ``count`` largest ``scores`` (those of the entries held here), sorted.

        Ties go to the lowest index, so the answer is the same on any number of shards as on one process
        (``torch.topk`` leaves ties to the implementation). Collective when sharded.
        """
        if count <= 0:
            return torch.empty(0, dtype=torch.long, device=scores.device)
        candidates = scores.topk(min(count, scores.numel())).values
        if self.sharded:
            padded = torch.full((count,), -math.inf, dtype=scores.dtype, device=scores.device)
            padded[: candidates.numel()] = candidates
            candidates = torch.cat(_all_gather(padded, self.group))
        threshold = candidates.topk(count).values[-1]
        above = (scores > threshold).nonzero().squeeze(1)
        tied = (scores == threshold).nonzero().squeeze(1)  # ascending: nonzero() keeps index order
        if not self.sharded:
            return torch.sort(torch.cat([above, tied[: count - above.numel()]])).values
        counts = torch.tensor([above.numel(), tied.numel()], device=scores.device)
        counts = torch.stack(_all_gather(counts, self.group))  # (ranks, 2), in rank order = index order
        rank = dist.get_rank(self.group)
        missing = count - int(counts[:, 0].sum())
        tied_before = int(counts[:rank, 1].sum())
        mine = torch.cat([above, tied[: max(0, min(missing - tied_before, tied.numel()))]]) + self.start
        return torch.sort(torch.cat(_all_gather_varlen(mine, self.group))).values


def _all_gather(tensor: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def _all_gather_varlen(tensor: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    """All-gather 1-D tensors whose lengths differ by rank."""
    sizes = [int(n) for n in _all_gather(torch.tensor([tensor.numel()], device=tensor.device), group)]
    padded = torch.zeros(max(sizes), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    return [part[:size] for part, size in zip(_all_gather(padded, group), sizes)]


__all__ = ["WeightLayout"]
