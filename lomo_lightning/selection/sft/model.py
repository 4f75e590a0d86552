"""SparseFineTuning: put sparse deltas on a model's linear layers and reselect their entries on SpIEL's schedule."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim import Optimizer

from lomo_lightning.optim.sm3 import SM3
from lomo_lightning.selection.base import modules_matching
from lomo_lightning.selection.sft.config import SFTConfig
from lomo_lightning.selection.sft.layer import SparseDeltaLinear, index_dtype, merged_weight
from lomo_lightning.selection.sft.quantize import quantize_weight
from lomo_lightning.selection.sft.regrowth import CandidateWindow, regrow_by_accumulated_gradients, regrow_by_sm3


class SparseFineTuning:
    """SpIEL sparse fine-tuning (Ansell et al., 2024) of a model's linear layers.

    :meth:`apply` replaces every target ``nn.Linear`` by a :class:`SparseDeltaLinear`: its weight
    becomes the frozen base ``W0`` (weight-only quantized with ``quantize_base``) and it gains ``k``
    trainable fp32 ``values`` at random entries, 0 at first. Every other parameter is frozen. The
    optimizer, the fused engine, checkpoints, DDP and FSDP2 then see ordinary parameters: build the
    optimizer from ``model.parameters()`` (frozen ones get no gradient and no state) or :meth:`parameters`.

    Call :meth:`step` after every optimizer step (:class:`~lomo_lightning.callbacks.SFTReselectionCallback`
    does). After step ``R * n + A`` (``R = reselection_steps``, ``A = selection_accumulation_steps``, up to
    ``total_steps``) each layer prunes the fraction ``p`` of its entries with the smallest ``|delta|`` and
    regrows as many (see :mod:`~lomo_lightning.selection.sft.regrowth`): ``p = 1`` at the first
    reselection, which replaces the random start, then ``p`` decays from ``initial_prune_fraction``
    linearly or as a cosine to 0 at ``total_steps``. Accumulated-gradient regrowth watches the gradients
    of a window of steps before each reselection: steps ``1..A``, then ``R*n .. R*n + A`` (the reference
    opens it after step ``R*n - 1``).

    Args:
        config: an :class:`SFTConfig`; or pass its fields as keyword arguments.
    """

    def __init__(self, config: SFTConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("SparseFineTuning takes a config or keyword arguments, not both")
        self.config = config if config is not None else SFTConfig(**options)
        self.completed_steps = 0
        # backward passes per optimizer step (gradient accumulation): an AG sample counts 1/accumulation_steps of a step
        self.accumulation_steps = 1
        self.layers: dict[str, SparseDeltaLinear] = {}
        self.windows: dict[str, CandidateWindow] = {}

    # -- set-up ------------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> SparseFineTuning:
        """Freeze ``model``, put sparse deltas on its target linear layers (in place) and draw their entries."""
        if any(isinstance(module, SparseDeltaLinear) for module in model.modules()):
            raise ValueError("the model already has sparse deltas: apply SparseFineTuning once, to the plain model")
        targets = self._target_modules(model)
        if not targets:
            raise ValueError("SparseFineTuning found no target nn.Linear in the model; pass targets=[regex, ...]")
        config = self.config
        target_numel = sum(linear.weight.numel() for _, linear in targets)
        budget = config.num_tunable_weights
        if budget is None:
            budget = int(config.density * sum(p.numel() for p in model.parameters()))  # tied parameters once
        if not 1 <= budget <= target_numel:
            raise ValueError(f"the budget of {budget} entries must be in [1, {target_numel}] (the target layers' entries)")
        generator = torch.Generator().manual_seed(config.seed)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.layers = {}
        for (name, linear), k in zip(targets, _split_budget(budget, [linear.weight.numel() for _, linear in targets])):
            if k == 0:
                continue  # too small for its share: stays a frozen nn.Linear
            if config.quantize_base is not None:
                quantize_weight(linear, config.quantize_base)
            layer = SparseDeltaLinear(linear, _sample_without_replacement(linear.weight.numel(), k, generator))
            model.set_submodule(name, layer)
            self.layers[name] = layer
        self.windows = {}
        self._open_windows()
        return self

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors: the values of every sparse delta."""
        return [layer.values for layer in self.layers.values()]

    @property
    def budget(self) -> int:
        """Total number of active entries."""
        return sum(layer.values.numel() for layer in self.layers.values())

    # -- the schedule ------------------------------------------------------------------------------

    def prune_fraction(self, step: int) -> float:
        """The fraction of each layer's entries that the reselection after ``step`` optimizer steps prunes."""
        config = self.config
        if step == config.selection_accumulation_steps:
            return 1.0  # the first reselection replaces the random start
        progress = step / self._total_steps()
        if config.prune_schedule == "linear":
            return config.initial_prune_fraction * (1.0 - progress)
        return config.initial_prune_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))

    def is_reselection_step(self, step: int) -> bool:
        """Whether entries are pruned and regrown after optimizer step ``step``."""
        config = self.config
        return step % config.reselection_steps == config.selection_accumulation_steps and step <= self._total_steps()

    def step(self, optimizer: Optimizer) -> int:
        """Count one optimizer step and reselect when due; returns how many entries were replaced."""
        if self.config.regrowth == "sm3" and not isinstance(optimizer, SM3):
            raise TypeError(
                f"regrowth='sm3' (SpIEL-MA) scores growth with the SM3 rule's accumulators, but the optimizer is "
                f"{type(optimizer).__name__}: train the values with lomo_lightning.SM3, or use regrowth='accumulated_gradients'"
            )
        self.completed_steps += 1
        replaced = 0
        if self.is_reselection_step(self.completed_steps):
            replaced = self.reselect(optimizer, self.prune_fraction(self.completed_steps))
        self._open_windows()
        return replaced

    def reselect(self, optimizer: Optimizer, fraction: float) -> int:
        """Prune the ``fraction`` of each layer's entries that moved least and regrow as many; returns the count."""
        replaced = 0
        for name, layer in self.layers.items():
            if self.config.regrowth == "sm3":
                replaced += regrow_by_sm3(layer, fraction, optimizer)
            elif name in self.windows:
                replaced += regrow_by_accumulated_gradients(layer, self.windows[name], fraction, optimizer, self.accumulation_steps)
        self.windows = {}
        return replaced

    def _total_steps(self) -> int:
        if self.config.total_steps is None:
            raise ValueError(
                "SparseFineTuning needs total_steps for its schedule: pass total_steps= or use SFTReselectionCallback, "
                "which sets it from trainer.estimated_stepping_batches"
            )
        return self.config.total_steps

    def _open_windows(self) -> None:
        """Watch the next step's gradients if it falls in an AG window that closes within ``total_steps``."""
        config = self.config
        upcoming = self.completed_steps + 1
        R, A = config.reselection_steps, config.selection_accumulation_steps
        closes_at = A if upcoming <= A else (upcoming // R) * R + A
        watching = (
            config.regrowth == "accumulated_gradients"
            and (upcoming <= A or (upcoming >= R and upcoming % R <= A))
            and (config.total_steps is None or closes_at <= config.total_steps)
        )
        if not watching:
            self.windows = {}
        for name, layer in self.layers.items():
            if watching and name not in self.windows:
                self.windows[name] = CandidateWindow(layer)
            layer.gradient_observer = self.windows[name] if watching else None

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model (which holds the values and indices) and the optimizer."""
        return {
            "completed_steps": self.completed_steps,
            "total_steps": self.config.total_steps,
            "windows": {name: window.state_dict() for name, window in self.windows.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`apply` (the model's own state dict restores the entries)."""
        self.completed_steps = state["completed_steps"]
        self.config.total_steps = state["total_steps"]
        self.windows = {}
        for name, saved in state["windows"].items():
            self.windows[name] = CandidateWindow(self.layers[name])
            self.windows[name].load_state_dict(saved)
        self._open_windows()

    # -- the delta ---------------------------------------------------------------------------------

    def export_delta(self, path: str | os.PathLike) -> None:
        """Save ``<layer>.weight.indices`` (int32 where it fits) and ``<layer>.weight.values`` (the fp32 delta).

        Names are those of the model given to :meth:`apply`, so :func:`apply_sparse_delta` merges the
        delta into a fresh, full-precision base (also after training on a quantized one). Under several
        processes call it on every rank: the values are the same everywhere, rank 0 writes.
        """
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.weight.indices"] = layer.indices.cpu().contiguous()
            tensors[f"{name}.weight.values"] = layer.values.detach().float().cpu().contiguous()
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_file(tensors, os.fspath(path), metadata={"format": "lomo_lightning.sparse_delta"})

    def describe(self) -> str:
        config = self.config
        return (
            f"SFT ({'SpIEL-AG' if config.regrowth == 'accumulated_gradients' else 'SpIEL-MA'}): {self.budget} entries in "
            f"{len(self.layers)} layers, reselected every {config.reselection_steps} steps, {self.completed_steps} steps done"
        )

    def _target_modules(self, model: nn.Module) -> list[tuple[str, nn.Linear]]:
        if self.config.targets is not None:
            chosen = modules_matching(model, self.config.targets)
            wrong = [f"{name} ({type(module).__name__})" for name, module in chosen if not isinstance(module, nn.Linear)]
            if wrong:
                raise ValueError(f"sparse fine-tuning targets nn.Linear layers only; these matched too: {', '.join(wrong[:5])}")
            return chosen  # type: ignore[return-value]
        output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
        return [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output_embeddings
        ]


def apply_sparse_delta(model: nn.Module, path: str | os.PathLike) -> None:
    """Add a delta saved by :meth:`SparseFineTuning.export_delta` into a plain ``model`` (same parameter names)."""
    tensors = load_file(os.fspath(path))
    with torch.no_grad():
        for key, indices in tensors.items():
            if not key.endswith(".indices"):
                continue
            name = key.removesuffix(".indices")
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), SparseDeltaLinear):
                raise ValueError(f"{name} already carries a sparse delta: merge a delta into the plain base model")
            weight = model.get_parameter(name)
            delta = tensors[f"{name}.values"].to(device=weight.device, dtype=weight.dtype)
            weight.view(-1).index_add_(0, indices.to(device=weight.device), delta)


def merge_sparse_deltas(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` of ``model`` as that of the plain model: each sparse layer's weight merged, its delta keys gone.

    The weight becomes ``W0 + Delta`` in ``W0``'s dtype (the base dequantized when it is quantized): the
    effective weight the layer computes with, which ``from_pretrained`` loads into an ``nn.Linear``.
    """
    merged = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLinear):
            prefix = f"{name}." if name else ""
            values, indices = merged.pop(f"{prefix}values"), merged.pop(f"{prefix}indices")
            merged[f"{prefix}weight"] = merged_weight(merged[f"{prefix}weight"], values, indices)
    return merged


def delta_size_report(model: nn.Module, path: str | os.PathLike) -> dict[str, float]:
    """Size of the delta file against the model's parameters (tied parameters counted once)."""
    delta_bytes = os.path.getsize(path)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"delta_bytes": delta_bytes, "model_bytes": model_bytes, "fraction": delta_bytes / model_bytes}


def _split_budget(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``sizes``, integer parts summing exactly to ``total`` (largest remainder)."""
    whole = sum(sizes)
    shares = [total * size / whole for size in sizes]
    parts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _sample_without_replacement(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct uniform indices below ``n`` (as int32 where they fit), without an O(n) permutation when ``k`` is small."""
    if 4 * k >= n:
        drawn = torch.randperm(n, generator=generator)[:k]
    else:
        drawn = torch.empty(0, dtype=torch.long)
        while drawn.numel() < k:
            drawn = torch.cat([drawn, torch.randint(n, (2 * k,), generator=generator)]).unique()
        # unique() sorts; a random subset of a uniform random set is still uniform.
        drawn = drawn[torch.randperm(drawn.numel(), generator=generator)[:k]]
    return drawn.to(index_dtype(n))


__all__ = ["SparseFineTuning", "apply_sparse_delta", "delta_size_report", "merge_sparse_deltas"]
