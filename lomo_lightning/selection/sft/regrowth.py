"""Prune and regrow the active entries of one layer, as SpIEL's reference does (``SftSelector``).

Both rules prune the ``count`` active entries with the smallest ``|delta|`` (their values go back to 0,
so the weight there is ``W0`` again) and grow as many inactive ones, whose values start at 0:

- SpIEL-AG (:func:`regrow_by_accumulated_gradients`): the candidates are the ``k`` entries with the largest
  ``|grad|`` over *all* entries at the start of a window, their gradients summed over the window
  (:class:`CandidateWindow`); the candidates with the largest ``|sum|`` that are not kept active grow. An
  active entry that is pruned and is also among them survives instead: it keeps its value and state.
  A regrown entry's AdamW moments start from the window's mean gradient and mean squared gradient,
  counter-corrected for a per-entry ``age`` (the number of steps they average), so that the rule's
  per-entry bias correction (:class:`~lomo_lightning.optim.sft_adamw.SFTAdamW`) recovers the means.
- SpIEL-MA (:func:`regrow_by_sm3`): the inactive entries with the largest ``row_i * col_j`` of the SM3
  rule's accumulators (fed by the active entries, never reset) grow; SM3's statistics stay as they are.

Every other per-entry state of the rule (any state tensor shaped like the values) is 0 for a regrown
entry and follows its entry otherwise. The entries are kept sorted by index.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lomo_lightning.selection.sft.layer import CsrIndices, SparseDeltaLinear, csr_indices, sampled_weight_gradient


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the data-parallel ranks (the default group), in place; itself on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


class CandidateWindow:
    """SpIEL-AG's statistics of one layer over one window: its candidates and their summed gradients.

    Installed as the layer's ``gradient_observer`` while the window is open. Its first call forms the
    dense weight gradient once to choose the ``k`` candidates (``k`` = the layer's active count) by
    ``|grad|`` over all entries; every call adds the candidates' gradients, sampled without the dense
    gradient. Gradients are averaged over data-parallel ranks first, so every rank chooses and sums
    the same numbers, those of the global batch.
    """

    def __init__(self, layer: SparseDeltaLinear) -> None:
        self.layer = layer
        self.candidates: Tensor | None = None
        self.grad_sum: Tensor | None = None
        self.grad_square_sum: Tensor | None = None
        self.samples = 0
        self._pattern: CsrIndices | None = None

    @torch.no_grad()
    def __call__(self, grad_output: Tensor, input: Tensor) -> None:
        if self.candidates is None:
            dense = mean_over_ranks(grad_output.float().t() @ input.float()).view(-1)
            chosen = dense.abs().topk(self.layer.values.numel(), sorted=False).indices
            self.candidates = chosen.sort().values.to(self.layer.indices.dtype)
            grads = dense[self.candidates.long()]
            del dense
            self.grad_sum, self.grad_square_sum = grads.clone(), grads.square()
        else:
            assert self.grad_sum is not None and self.grad_square_sum is not None  # set with the candidates
            grads = mean_over_ranks(sampled_weight_gradient(grad_output, input, self.pattern()))
            self.grad_sum += grads
            self.grad_square_sum.addcmul_(grads, grads)
        self.samples += 1

    def pattern(self) -> CsrIndices:
        if self._pattern is None:
            assert self.candidates is not None  # chosen by the first call
            self._pattern = csr_indices(self.candidates, self.layer.weight_shape)
        return self._pattern

    def state_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "grad_sum": self.grad_sum, "grad_square_sum": self.grad_square_sum, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.layer.indices.device
        move = lambda value: value.to(device) if isinstance(value, Tensor) else value  # noqa: E731
        self.candidates, self.grad_sum, self.grad_square_sum = (move(state[key]) for key in ("candidates", "grad_sum", "grad_square_sum"))
        self.samples = state["samples"]
        self._pattern = None


@torch.no_grad()
def regrow_by_accumulated_gradients(
    layer: SparseDeltaLinear, window: CandidateWindow, fraction: float, optimizer: Optimizer, accumulation_steps: int = 1
) -> int:
    """SpIEL-AG's prune and regrow of ``layer``; returns how many entries were replaced."""
    if window.candidates is None:
        return 0  # the layer got no gradient during the window
    assert window.grad_sum is not None and window.grad_square_sum is not None  # set with the candidates
    values, indices = layer.values, layer.indices
    count = int(values.numel() * fraction)
    pruned = values.abs().topk(count, largest=False, sorted=True).indices
    kept = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    kept[pruned] = False
    outgoing = indices[pruned]
    eligible = ~torch.isin(window.candidates, indices[kept])
    candidates = window.candidates[eligible]
    grad_sum, grad_square_sum = window.grad_sum[eligible], window.grad_square_sum[eligible]
    best = grad_sum.abs().topk(min(count, candidates.numel()), sorted=True).indices
    incoming, grad_sum, grad_square_sum = candidates[best], grad_sum[best], grad_square_sum[best]
    # a pruned entry that is also a winning candidate stays where it is, with its value and state
    survives = torch.isin(incoming, outgoing)
    pruned = pruned[~torch.isin(outgoing, incoming)]
    incoming, grad_sum, grad_square_sum = incoming[~survives], grad_sum[~survives], grad_square_sum[~survives]
    pruned = pruned[: incoming.numel()]
    seeds: dict[str, Tensor] = {}
    state, group = optimizer.state.get(values, {}), _group_of(optimizer, values)
    if "age" in state and "betas" in group:
        # unbiased means over the window, biased back so that bias correction at this age recovers them
        age = torch.full_like(grad_sum, window.samples / accumulation_steps)
        beta1, beta2 = group["betas"]
        seeds = {
            "age": age,
            "exp_avg": grad_sum.div(window.samples).mul_(torch.pow(beta1, age).neg_().add_(1.0)),
            "exp_avg_sq": grad_square_sum.div(window.samples).mul_(torch.pow(beta2, age).neg_().add_(1.0)),
        }
    replace_entries(layer, optimizer, pruned, incoming, seeds)
    return pruned.numel()


@torch.no_grad()
def regrow_by_sm3(layer: SparseDeltaLinear, fraction: float, optimizer: Optimizer) -> int:
    """SpIEL-MA's prune and regrow of ``layer`` by the SM3 rule's accumulators; returns how many were replaced."""
    values, indices = layer.values, layer.indices
    state = optimizer.state.get(values, {})
    if "accumulator_1" not in state:
        return 0  # no SM3 step on these values yet: nothing scores growth
    count = min(int(values.numel() * fraction), layer.weight.numel() - values.numel())
    pruned = values.abs().topk(count, largest=False, sorted=True).indices
    # outer(row, col) of the accumulators ((rows, 1) x (1, cols)); scores are >= 0, so active entries never win
    scores = (state["accumulator_0"] * state["accumulator_1"]).view(-1)
    scores[indices.long()] = -1.0
    incoming = scores.topk(count, sorted=False).indices
    replace_entries(layer, optimizer, pruned, incoming, {})
    return count


def replace_entries(layer: SparseDeltaLinear, optimizer: Optimizer, positions: Tensor, incoming: Tensor, seeds: dict[str, Tensor]) -> None:
    """Put the flat indices ``incoming`` at ``positions``: value 0, per-entry state from ``seeds`` or 0; keep indices sorted."""
    values, indices = layer.values, layer.indices
    per_entry = [
        (key, tensor)
        for key, tensor in optimizer.state.get(values, {}).items()
        if isinstance(tensor, Tensor) and tensor.shape == values.shape
    ]
    indices[positions] = incoming.to(indices.dtype)
    values[positions] = 0.0
    for key, tensor in per_entry:
        tensor[positions] = seeds[key].to(tensor.dtype) if key in seeds else 0.0
    order = indices.argsort()
    indices.copy_(indices[order])
    values.copy_(values[order])
    for _, tensor in per_entry:
        tensor.copy_(tensor[order])


def _group_of(optimizer: Optimizer, param: Tensor) -> dict[str, Any]:
    return next((group for group in optimizer.param_groups if any(p is param for p in group["params"])), {})


__all__ = ["CandidateWindow", "mean_over_ranks", "regrow_by_accumulated_gradients", "regrow_by_sm3", "replace_entries"]
