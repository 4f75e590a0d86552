"""Sparse fine-tuning: only a small, evolving set of entries of each weight learns.

Ansell et al., "Scaling Sparse Fine-Tuning to Large Language Models" (SpIEL, 2024). Each target weight ``W``
keeps an active set of flat indices; the optimizer owns only the ``k`` active values, so its state is
O(k) rather than O(numel). Every other entry stays bit-identical to the pretrained ``W0``.

Per step (inside backward, through a :class:`~lomo_lightning.selection.base.GradientRoute`):
``gather`` picks ``grad.view(-1)[indices]`` for the update rule and records growth statistics;
``scatter`` writes the updated values back into ``W``.

Every ``reselection_steps`` steps (:meth:`SparseFineTuning.step`):

1. Prune: the fraction ``p_t`` of active entries with the smallest ``|W - W0|`` is dropped and reset to
   ``W0``. ``p_t`` decays from ``initial_prune_fraction`` to 0 over ``total_steps``, linearly or as a cosine.
2. Regrow as many inactive entries, so the active count stays exactly at the budget:

   - ``"sm3"`` (SpIEL-MA): SM3 row and column accumulators of the squared gradient (Anil et al., 2019),
     O(rows + cols) memory, updated every step: ``nu = min(row_i, col_j) + g_ij^2``, ``row_i = max_j nu``,
     ``col_j = max_i nu``. The inactive entries with the largest ``min(row_i, col_j)`` grow. The
     accumulators restart after each reselection, so each window scores its own gradients.
   - ``"accumulated_gradients"`` (SpIEL-AG): ``selection_accumulation_steps`` steps before a reselection,
     the ``candidate_multiplier`` x (largest regrowth count) inactive entries with the largest ``|g|``
     become candidates; their gradients are summed over those steps, and the candidates with the largest
     ``|sum|`` grow. Their optimizer moments start from the accumulated statistics
     (``exp_avg`` <- mean gradient, ``exp_avg_sq`` <- mean squared gradient).

3. The optimizer state follows the values: every state tensor shaped like ``values`` is remapped, kept
   entries keep their state, grown entries start at zero (or from the seeds above).

The budget is ``round(density x total target numel)``, split over the weights in proportion to their size.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lomo_lightning.selection.base import register_routes
from lomo_lightning.selection.layout import WeightLayout

REGROWTH_RULES = ("sm3", "accumulated_gradients")
PRUNE_SCHEDULES = ("linear", "cosine")


class SM3Growth:
    """SM3 row/column accumulators of the squared gradient; scores an entry by ``min(row_i, col_j)``.

    On shards (FSDP2 holds whole rows) the accumulators stay whole and the same on every rank: the local
    rows' maxima and the local column maxima travel in one all-reduce (max) per step.
    """

    def __init__(self, weight: Tensor) -> None:
        rows = weight.shape[0]
        self.row = torch.zeros(rows, device=weight.device, dtype=torch.float32)
        self.col = torch.zeros(weight.numel() // rows, device=weight.device, dtype=torch.float32)

    def observe(self, grad: Tensor, route: SparseRoute) -> None:
        layout = route.layout
        grad = layout.local_rows(grad.detach()).float()
        rows = slice(layout.row_start, layout.row_stop)
        # One dense temporary, the size of the gradient (shard) that already exists, freed when the hook returns.
        nu = torch.minimum(self.row[rows, None], self.col[None, :]).addcmul_(grad, grad)
        if not layout.sharded:
            self.row, self.col = nu.amax(dim=1), nu.amax(dim=0)
            return
        # every accumulator is >= 0: zeros stand for the rows held elsewhere, and max completes both at once
        maxima = torch.zeros(self.row.numel() + self.col.numel(), device=nu.device, dtype=torch.float32)
        maxima[rows] = nu.amax(dim=1)
        maxima[self.row.numel() :] = nu.amax(dim=0)
        layout.all_reduce_max_(maxima)
        self.row, self.col = maxima[: self.row.numel()].clone(), maxima[self.row.numel() :].clone()

    def grow(self, count: int, route: SparseRoute) -> tuple[Tensor, dict[str, Tensor]]:
        layout = route.layout
        scores = torch.minimum(self.row[layout.row_start : layout.row_stop, None], self.col[None, :]).reshape(-1)
        scores[layout.locate(route.indices)[1]] = -1.0  # scores are >= 0, so active entries never win
        return layout.top_indices(scores, count), {}

    def reset(self) -> None:
        self.row.zero_()
        self.col.zero_()

    def to(self, device: torch.device) -> None:
        self.row, self.col = self.row.to(device), self.col.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"row": self.row.clone(), "col": self.col.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.row.copy_(state["row"])
        self.col.copy_(state["col"])


class AccumulatedGradientGrowth:
    """Gradients of a candidate set of inactive entries, summed over the window before a reselection."""

    def __init__(self, candidate_count: int) -> None:
        self.candidate_count = candidate_count
        self.candidates: Tensor | None = None
        self.grad_sum: Tensor | None = None
        self.grad_square_sum: Tensor | None = None
        self.steps = 0

    def choose_candidates(self, grad: Tensor, route: SparseRoute) -> None:
        layout = route.layout
        scores = layout.local_flat(grad.detach()).abs().float()
        scores[layout.locate(route.indices)[1]] = -1.0
        self.candidates = layout.top_indices(scores, self.candidate_count)
        self.grad_sum = torch.zeros(self.candidate_count, device=scores.device, dtype=torch.float32)
        self.grad_square_sum = torch.zeros_like(self.grad_sum)
        self.steps = 0

    def observe(self, grad: Tensor, route: SparseRoute) -> None:
        if route.phase == "choose":
            self.choose_candidates(grad, route)
        if route.phase in ("choose", "accumulate"):
            picked = route.layout.read(grad.detach(), self.candidates)
            self.grad_sum += picked
            self.grad_square_sum += picked.square()
            self.steps += 1

    def grow(self, count: int, route: SparseRoute) -> tuple[Tensor, dict[str, Tensor]]:
        if self.candidates is None or self.steps == 0:
            return torch.empty(0, dtype=torch.long, device=route.indices.device), {}
        best = self.grad_sum.abs().topk(min(count, self.candidate_count)).indices
        seeds = {
            "exp_avg": self.grad_sum[best] / self.steps,
            "exp_avg_sq": self.grad_square_sum[best] / self.steps,
        }
        return self.candidates[best], seeds

    def reset(self) -> None:
        self.candidates = self.grad_sum = self.grad_square_sum = None
        self.steps = 0

    def to(self, device: torch.device) -> None:
        for name in ("candidates", "grad_sum", "grad_square_sum"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))

    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "grad_sum": self.grad_sum,
            "grad_square_sum": self.grad_square_sum,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.candidates = state["candidates"]
        self.grad_sum = state["grad_sum"]
        self.grad_square_sum = state["grad_square_sum"]
        self.steps = state["steps"]


@dataclass(eq=False)
class SparseRoute:
    """Route from a dense weight ``source`` to its ``k`` active ``values`` (the tensor the optimizer owns).

    ``indices``, ``values``, ``base_values`` and the growth statistics are global: the same on every rank
    and the same as on one process. When ``source`` is an FSDP2 shard, its :attr:`layout` reads the
    active entries' gradients from the local rows and completes them with one all-reduce, and
    :meth:`scatter` writes back only the entries held here.
    """

    name: str
    source: nn.Parameter
    indices: Tensor
    values: Tensor
    base_values: Tensor
    growth: SM3Growth | AccumulatedGradientGrowth
    # Set by SparseFineTuning before each step: which part of the AG window this step's gradient is for.
    phase: str | None = field(default=None)
    _layout: WeightLayout | None = field(default=None, repr=False)

    @property
    def target(self) -> Tensor:
        return self.values

    @property
    def layout(self) -> WeightLayout:
        """Where ``source``'s entries live (recomputed when the source is replaced, e.g. by ``fully_shard``)."""
        if self._layout is None or self._layout.weight is not self.source:
            self._layout = WeightLayout(self.source)
        return self._layout

    def bind(self, source: nn.Parameter) -> None:
        """Follow the model's current parameter: ``fully_shard`` replaces it, Lightning moves it to the device.

        ``values`` keeps its identity (the optimizer holds it), so it moves through ``.data``.
        """
        self.source = source
        device = source.device
        if self.indices.device != device:
            self.indices = self.indices.to(device)
            self.base_values = self.base_values.to(device)
            self.values.data = self.values.data.to(device)
            self.growth.to(device)

    def gather(self, grad: Tensor) -> Tensor:
        self.growth.observe(grad, self)
        return self.layout.read(grad, self.indices).to(self.values.dtype)

    def peek(self, grad: Tensor) -> Tensor:
        # only the entries held here: the engine completes the norm over the shard group
        return self.layout.read_local(grad, self.indices)

    def scatter(self) -> None:
        with torch.no_grad():
            self.layout.write(self.source.detach(), self.indices, self.values.detach())


class SparseFineTuning:
    """SpIEL sparse fine-tuning of the target weights of a model (see module docstring).

    Args:
        density: fraction of the target entries that are active, in (0, 1].
        regrowth: ``"sm3"`` (SpIEL-MA) or ``"accumulated_gradients"`` (SpIEL-AG).
        reselection_steps: optimizer steps between two prune-and-regrow rounds.
        prune_schedule: ``"linear"`` or ``"cosine"`` decay of the pruned fraction to 0 at ``total_steps``.
        initial_prune_fraction: pruned fraction of the active entries at step 0.
        selection_accumulation_steps: length of the AG accumulation window (at most ``reselection_steps``;
            unused by SM3).
        candidate_multiplier: AG candidates per entry that may regrow.
        targets: regexes searched in parameter names; default every ``nn.Linear`` (or GPT-2 ``Conv1D``)
            weight except the embeddings and the LM head.
        seed: seed of the initial random active sets.
        total_steps: length of training for the prune schedule (set by ``SFTReselectionCallback`` if None).
    """

    def __init__(
        self,
        density: float = 0.01,
        regrowth: str = "sm3",
        reselection_steps: int = 20,
        prune_schedule: str = "linear",
        initial_prune_fraction: float = 0.2,
        selection_accumulation_steps: int = 5,
        candidate_multiplier: int = 4,
        targets: list[str] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if regrowth not in REGROWTH_RULES:
            raise ValueError(f"unknown regrowth {regrowth!r}; choose one of {REGROWTH_RULES}")
        if prune_schedule not in PRUNE_SCHEDULES:
            raise ValueError(f"unknown prune_schedule {prune_schedule!r}; choose one of {PRUNE_SCHEDULES}")
        if not 0.0 <= initial_prune_fraction <= 1.0:
            raise ValueError(f"initial_prune_fraction must be in [0, 1], got {initial_prune_fraction}")
        if reselection_steps < 1:
            raise ValueError(f"reselection_steps must be >= 1, got {reselection_steps}")
        # the window only exists for accumulated gradients; SM3 observes every step
        if regrowth == "accumulated_gradients" and not 1 <= selection_accumulation_steps <= reselection_steps:
            raise ValueError(
                f"selection_accumulation_steps must be in [1, reselection_steps={reselection_steps}] for "
                f"regrowth='accumulated_gradients', got {selection_accumulation_steps}"
            )
        if candidate_multiplier < 1:
            raise ValueError(f"candidate_multiplier must be >= 1, got {candidate_multiplier}")
        self.density = density
        self.regrowth = regrowth
        self.reselection_steps = reselection_steps
        self.prune_schedule = prune_schedule
        self.initial_prune_fraction = initial_prune_fraction
        self.selection_accumulation_steps = selection_accumulation_steps
        self.candidate_multiplier = candidate_multiplier
        self.targets = targets
        self.seed = seed
        self.total_steps = total_steps
        self.completed_steps = 0
        self.routes: list[SparseRoute] = []

    @property
    def budget(self) -> int:
        """Total number of active entries over all target weights."""
        return sum(route.indices.numel() for route in self.routes)

    def apply(self, model: nn.Module) -> SparseFineTuning:
        """Freeze everything but the target weights, draw the initial active sets and register the routes."""
        named_targets = self._target_parameters(model)
        if not named_targets:
            raise ValueError("SparseFineTuning found no target weight in the model; pass targets=[regex, ...]")
        sizes = [parameter.numel() for _, parameter in named_targets]
        budgets = _split_budget(round(self.density * sum(sizes)), sizes)
        generator = torch.Generator().manual_seed(self.seed)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.routes = []
        for (name, weight), k in zip(named_targets, budgets):
            if k == 0:
                continue  # too small for the density: stays frozen, as an empty route would
            # Targets keep requires_grad so backward produces their dense gradient for the route to gather.
            weight.requires_grad_(True)
            indices = _sample_without_replacement(weight.numel(), k, generator).to(weight.device)
            base_values = weight.detach().reshape(-1)[indices].clone()
            self.routes.append(
                SparseRoute(
                    name=name,
                    source=weight,
                    indices=indices,
                    values=base_values.clone().requires_grad_(True),
                    base_values=base_values,
                    growth=self._growth_for(weight, k),
                )
            )
        register_routes(model, self.routes)
        self._set_phases()
        return self

    def parameters(self) -> list[Tensor]:
        """The tensors to build the optimizer from: the active values of every target weight."""
        return [route.values for route in self.routes]

    def prune_fraction(self, step: int) -> float:
        """``p_t``: the fraction of active entries pruned by a reselection after ``step`` optimizer steps."""
        if self.total_steps is None:
            raise ValueError(
                "SparseFineTuning needs total_steps for its prune schedule: pass total_steps= or use "
                "SFTReselectionCallback, which sets it from trainer.estimated_stepping_batches"
            )
        progress = min(step / self.total_steps, 1.0)
        if self.prune_schedule == "linear":
            return self.initial_prune_fraction * (1.0 - progress)
        return self.initial_prune_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Count one optimizer step; reselect when due. Call once after every optimizer step."""
        self.completed_steps += 1
        if self.completed_steps % self.reselection_steps == 0:
            self.reselect(optimizer)
        self._set_phases()

    @torch.no_grad()
    def reselect(self, optimizer: torch.optim.Optimizer) -> None:
        """Prune the active entries that moved least, regrow as many, and remap ``optimizer``'s state."""
        fraction = self.prune_fraction(self.completed_steps)
        for route in self.routes:
            k = route.indices.numel()
            wanted = min(round(fraction * k), route.source.numel() - k)
            grown, seeds = route.growth.grow(wanted, route)
            # AG may offer fewer candidates than wanted; pruning as many as grow keeps the budget exact.
            count = grown.numel()
            pruned = (route.values - route.base_values).abs().topk(count, largest=False).indices
            kept = torch.ones(k, dtype=torch.bool, device=route.indices.device)
            kept[pruned] = False
            weight = route.source.detach()
            route.layout.write(weight, route.indices[pruned], route.base_values[pruned])
            # Inactive entries are untouched, so W there still is W0.
            grown_base = route.layout.read(weight, grown).to(route.base_values.dtype)
            route.indices = torch.cat([route.indices[kept], grown])
            route.base_values = torch.cat([route.base_values[kept], grown_base])
            route.values.copy_(torch.cat([route.values[kept], grown_base.to(route.values.dtype)]))
            for key, state in optimizer.state.get(route.values, {}).items():
                if isinstance(state, Tensor) and state.shape == route.values.shape:
                    seed = seeds.get(key)
                    fresh = torch.zeros(count, dtype=state.dtype, device=state.device) if seed is None else seed
                    state.copy_(torch.cat([state[kept], fresh.to(state.dtype)]))
            route.growth.reset()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model and optimizer: the active sets, W0 there, statistics."""
        return {
            "completed_steps": self.completed_steps,
            "total_steps": self.total_steps,
            "routes": {
                route.name: {
                    "indices": route.indices.clone(),
                    "base_values": route.base_values.clone(),
                    "growth": route.growth.state_dict(),
                }
                for route in self.routes
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`apply`, on a model whose weights were restored already."""
        self.completed_steps = state["completed_steps"]
        self.total_steps = state["total_steps"]
        for route in self.routes:
            saved = state["routes"][route.name]
            route.indices = saved["indices"].to(route.indices.device)
            route.base_values = saved["base_values"].to(route.base_values.device)
            # The checkpointed weight holds the trained values at the active entries.
            route.values.copy_(route.layout.read(route.source.detach(), route.indices))
            route.growth.load_state_dict(saved["growth"])
        self._set_phases()

    def export_delta(self, path: str | os.PathLike) -> None:
        """Save ``<name>.indices`` (int32 where it fits) and ``<name>.values`` (``W - W0`` there) as safetensors.

        Under several processes, call it on every rank (sharded weights are read collectively); rank 0 writes.

        Names are those of the model given to :meth:`apply`: apply to the Hugging Face model itself (not a
        wrapper that prefixes its names) for a delta that :func:`apply_sparse_delta` merges into a fresh one.
        """
        tensors = {}
        for route in self.routes:
            index_dtype = torch.int32 if route.source.numel() < 2**31 else torch.int64
            delta = route.layout.read(route.source.detach(), route.indices).to(route.base_values.dtype) - route.base_values
            tensors[f"{route.name}.indices"] = route.indices.to(index_dtype).cpu().contiguous()
            tensors[f"{route.name}.values"] = delta.cpu().contiguous()
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_file(tensors, os.fspath(path), metadata={"format": "lomo_lightning.sparse_delta"})

    def _target_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        if self.targets is not None:
            return [
                (name, parameter)
                for name, parameter in model.named_parameters()
                if any(re.search(pattern, name) for pattern in self.targets)
            ]
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        output_embeddings = getattr(model, "get_output_embeddings", lambda: None)()
        if output_embeddings is not None:
            embeddings.add(id(output_embeddings.weight))
        return [
            (f"{module_name}.weight" if module_name else "weight", module.weight)
            for module_name, module in model.named_modules()
            if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
            and id(module.weight) not in embeddings
        ]

    def _growth_for(self, weight: Tensor, k: int) -> SM3Growth | AccumulatedGradientGrowth:
        if self.regrowth == "sm3":
            return SM3Growth(weight)
        most_regrown = math.ceil(self.initial_prune_fraction * k)
        return AccumulatedGradientGrowth(min(self.candidate_multiplier * most_regrown, weight.numel() - k))

    def _set_phases(self) -> None:
        """Tell each route what the next step's gradient is for (only AG has a window)."""
        position = self.completed_steps % self.reselection_steps  # steps already done in this window
        window_start = self.reselection_steps - self.selection_accumulation_steps
        phase = None
        if self.regrowth == "accumulated_gradients":
            phase = "choose" if position == window_start else "accumulate" if position > window_start else None
        for route in self.routes:
            route.phase = phase


def apply_sparse_delta(model: nn.Module, path: str | os.PathLike) -> None:
    """Add a delta saved by :meth:`SparseFineTuning.export_delta` into ``model`` (same parameter names)."""
    tensors = load_file(os.fspath(path))
    with torch.no_grad():
        for key, indices in tensors.items():
            if not key.endswith(".indices"):
                continue
            name = key.removesuffix(".indices")
            weight = model.get_parameter(name)
            delta = tensors[f"{name}.values"].to(device=weight.device, dtype=weight.dtype)
            weight.detach().view(-1).index_add_(0, indices.to(device=weight.device, dtype=torch.long), delta)


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
    """``k`` distinct uniform indices below ``n``, without an O(n) permutation when ``k`` is small."""
    if 4 * k >= n:
        return torch.randperm(n, generator=generator)[:k]
    drawn = torch.empty(0, dtype=torch.long)
    while drawn.numel() < k:
        drawn = torch.cat([drawn, torch.randint(n, (2 * k,), generator=generator)]).unique()
    # unique() sorts; a random subset of a uniform random set is still uniform.
    return drawn[torch.randperm(drawn.numel(), generator=generator)[:k]]


__all__ = ["SparseFineTuning", "SparseRoute", "apply_sparse_delta", "delta_size_report"]
