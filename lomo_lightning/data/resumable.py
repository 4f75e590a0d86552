"""A shuffled training loader that a resumed run continues at the next unseen batch, on any number of processes.

Lightning saves the ``state_dict()`` of every training loader that has one with each checkpoint
(``_FitLoop.on_save_checkpoint``) and hands it back to ``load_state_dict()`` before iterating on resume.
Lightning does not prefetch from a loader that has a length, so the batches this loader has handed out
are exactly the batches trained so far.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class _SkippingDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that starts ``start`` indices into the epoch's order (its length stays the whole epoch)."""

    start: int = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


class ResumableDataLoader(DataLoader):
    """Shuffled batches whose order depends only on ``(seed, epoch)``, resumable mid-epoch.

    Epoch ``e`` visits the examples in the order of ``DistributedSampler(seed=seed)`` at ``set_epoch(e)``:
    one permutation per epoch, of which process ``rank`` takes every ``num_replicas``-th index (the
    permutation is padded to a multiple of ``num_replicas``, as ``DistributedSampler`` does). Lightning
    calls ``set_epoch`` at the start of every epoch; iterated by hand, the loader moves to the next epoch
    itself. ``state_dict()`` is the epoch and the number of batches handed out in it; after
    ``load_state_dict()`` the next iteration of that epoch starts at the first batch not handed out.

    Args:
        dataset: a map-style dataset.
        batch_size: examples per batch on this process.
        seed: seeds every epoch's permutation.
        num_replicas, rank: the data-parallel processes and this one's place among them.
        **kwargs: any other ``DataLoader`` argument but ``shuffle``, ``sampler`` and ``batch_sampler``.
    """

    def __init__(
        self, dataset: Dataset, *, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, **kwargs: Any
    ) -> None:
        sampler = _SkippingDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch = 0
        self._batches_handed_out = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator, not DataLoader's _BaseDataLoaderIter
        sampler = self.sampler
        assert isinstance(sampler, _SkippingDistributedSampler)
        assert self.batch_size is not None  # given to __init__
        epoch = sampler.epoch
        if epoch != self._epoch:  # a position saved in another epoch does not apply to this one
            self._epoch, self._batches_handed_out = epoch, 0
        sampler.start = self._batches_handed_out * self.batch_size
        for batch in super().__iter__():
            self._batches_handed_out += 1
            yield batch
        sampler.start = 0
        sampler.set_epoch(epoch + 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches_handed_out}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._epoch, self._batches_handed_out = state_dict["epoch"], state_dict["batches"]


__all__ = ["ResumableDataLoader"]
