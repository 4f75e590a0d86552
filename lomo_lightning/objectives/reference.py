"""DPO's reference log-probabilities without a reference model in memory: one pass of the initial model, cached on disk.

As TRL's ``precompute_ref_log_probs``: before training, the model as it is (the reference) runs once over
the preference pairs, in eval mode and without gradients, and keeps each pair's summed log-probabilities
of its chosen and rejected response. Training then needs no second model. The values are cached in
``<cache_dir>/reference_logps/<key>.safetensors``, written to a temporary sibling and renamed, so that a
reader never sees half a file. The key hashes everything the values depend on:

- the model: its config and every tensor of its state dict (a changed weight is a new reference);
- the data: the token ids and labels of every pair, in order (which is what the records, the tokenizer,
  its chat template and ``seq_len`` decide);
- the settings: parameter dtype, autocast dtype, device type, attention implementation, batch size and
  loss chunking (they move the values by rounding).

Under ``torch.distributed`` every rank computes a share of the batches (batch ``i`` on rank ``i % world``),
the shares are gathered to every rank, and rank 0 writes the file. The batches are the same for any
number of ranks, so the values are too; rank 0 alone hashes and reads the cache and broadcasts, so every
rank holds the same values even without a shared file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lomo_lightning.cache_entries import store_entry, verified_entry
from lomo_lightning.objectives.causal_lm import ChunkTokens, sequence_log_probs
from lomo_lightning.objectives.dpo import REFERENCE_KEY

log = logging.getLogger(__name__)

CACHE_SUBDIRECTORY = "reference_logps"
# Bump when the values cached for the same key change meaning, to invalidate older entries.
CACHE_FORMAT = 2


def reference_log_probs(
    model: nn.Module,
    dataset: Dataset,
    collator: Callable[[list[dict]], dict[str, Tensor]],
    *,
    batch_size: int,
    cache_dir: str | os.PathLike,
    chunk_tokens: ChunkTokens = None,
    reference_weights: str | None = None,
) -> Tensor:
    """The ``(pairs, 2)`` sequence log-probabilities (chosen, rejected) of every pair of ``dataset`` under ``model``.

    Loaded from the cache under ``cache_dir`` when an entry for this model, data and settings exists;
    otherwise computed (on the model's device, in batches of ``batch_size`` pairs padded by ``collator``)
    and cached. Call it on every rank, before the model is sharded: the model must be whole.

    ``reference_weights`` names the weights the values belong to (a :func:`weights_digest`, e.g. of the
    model at the start of training), where ``model`` may have been trained since: the entry of those
    weights is looked up, and computed from ``model`` only if ``model`` still has them; otherwise a
    missing entry is refused (``RuntimeError``), since the values of weights that are gone cannot be made.
    """
    rank, world = _rank_and_world()
    path = None
    cached = None
    gone = False
    if rank == 0:
        key = reference_cache_key(model, dataset, batch_size=batch_size, chunk_tokens=chunk_tokens, weights=reference_weights)
        path = Path(cache_dir) / CACHE_SUBDIRECTORY / f"{key}.safetensors"
        cached = load_file(path)[REFERENCE_KEY] if verified_entry(path) else None  # its digest checked first
        gone = cached is None and reference_weights is not None and weights_digest(model) != reference_weights
    cached, gone = _broadcast((cached, gone), world)
    if gone:
        raise RuntimeError(
            f"the reference log-probabilities of the model at the start of training (weights {reference_weights}) "
            f"are not in {Path(cache_dir) / CACHE_SUBDIRECTORY} and the model has been trained since: restore that "
            "cache, or start again from the initial model"
        )
    if cached is not None:
        return cached
    if rank == 0:
        log.info("Computing the reference log-probabilities of %d pairs once, into %s", len(dataset), path)
    batches: dict[int, Tensor] = {}
    for share in _gather(_compute_share(model, dataset, collator, batch_size, chunk_tokens, rank, world), world):
        batches.update(share)
    values = torch.cat([batches[index] for index in sorted(batches)])
    if rank == 0:
        assert path is not None  # rank 0 looked up the cache
        _save_atomically(values, path)
    return values


def add_reference_log_probs(dataset: Dataset, values: Tensor) -> Dataset:
    """``dataset`` with a ``reference_logps`` column: each pair's ``[chosen, rejected]`` values, for the collator."""
    if len(values) != len(dataset):
        raise ValueError(f"{len(values)} reference values for {len(dataset)} pairs")
    if REFERENCE_KEY in dataset.column_names:
        dataset = dataset.remove_columns(REFERENCE_KEY)
    return dataset.add_column(REFERENCE_KEY, values.tolist())


def reference_cache_key(
    model: nn.Module, dataset: Dataset, *, batch_size: int, chunk_tokens: ChunkTokens, weights: str | None = None
) -> str:
    """The name of the cache entry: a hash of the model's config and weights, the pairs' tokens and the settings.

    ``weights``: the :func:`weights_digest` to key by instead of ``model``'s own (the weights it started from).
    """
    parameter = next(model.parameters())
    device = parameter.device.type
    config = getattr(model, "config", None)
    return _hash_options(
        kind="reference-logps",
        config=config.to_json_string() if config is not None else type(model).__name__,
        attention=getattr(config, "_attn_implementation", None),
        weights=weights if weights is not None else weights_digest(model),
        pairs=pairs_digest(dataset),
        dtype=str(parameter.dtype),
        autocast=str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None,
        device=device,
        batch_size=batch_size,
        chunk_tokens=chunk_tokens,
    )


def weights_digest(model: nn.Module) -> str:
    """A hash of every tensor of ``model``'s state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def pairs_digest(dataset: Dataset) -> str:
    """A hash of every column of ``dataset`` (the pairs' token ids and labels), in order; its reference values aside.

    Every column counts, whatever the data module names them: the objectives do not know the data's columns.
    """
    columns = sorted(name for name in dataset.column_names if name != REFERENCE_KEY)
    table = dataset.select_columns(columns).with_format("arrow")[:]
    digest = hashlib.blake2b(digest_size=16)
    for name in columns:
        rows = table.column(name).combine_chunks()
        digest.update(f"{name}\0{rows.type}\0".encode())
        if hasattr(rows, "value_lengths"):  # a list column: each row's length, then every value
            digest.update(rows.value_lengths().to_numpy(zero_copy_only=False).astype("int64").tobytes())
            rows = rows.flatten()
        digest.update(rows.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return digest.hexdigest()


def _hash_options(**options: object) -> str:
    """A short stable hash of ``options`` (JSON-serialisable values) and :data:`CACHE_FORMAT`."""
    payload = json.dumps({"format": CACHE_FORMAT, **options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@torch.no_grad()
def _compute_share(
    model: nn.Module,
    dataset: Dataset,
    collator: Callable[[list[dict]], dict[str, Tensor]],
    batch_size: int,
    chunk_tokens: ChunkTokens,
    rank: int,
    world: int,
) -> dict[int, Tensor]:
    """This rank's batches: batch index -> ``(pairs in it, 2)`` values."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # the reference is the model as a function: no dropout
    share = {}
    try:
        for index in range(rank, math.ceil(len(dataset) / batch_size), world):
            rows = list(dataset.select(range(index * batch_size, min(len(dataset), (index + 1) * batch_size))))
            batch = {key: value.to(device) for key, value in collator(rows).items() if key != REFERENCE_KEY}
            logps = sequence_log_probs(
                model, batch["input_ids"], batch["labels"], chunk_tokens, attention_mask=batch["attention_mask"]
            )
            share[index] = logps.float().cpu().view(2, -1).T.contiguous()
    finally:
        model.train(was_training)
    return share


def _save_atomically(values: Tensor, path: Path) -> None:
    def write(staging: Path) -> None:
        save_file({REFERENCE_KEY: values}, staging, metadata={"columns": json.dumps(["chosen", "rejected"])})

    store_entry(path, write, directory=False)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _gather(share: dict[int, Tensor], world: int) -> list[dict[int, Tensor]]:
    if world == 1:
        return [share]
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, share)
    return shares


__all__ = ["add_reference_log_probs", "pairs_digest", "reference_cache_key", "reference_log_probs", "weights_digest"]
