"""What the update rules share: the protocols the fused engine calls (:class:`FusableRule`,
:class:`SplitStepRule`), their base class :class:`PerParameterOptimizer` (``step()`` is a loop over
parameters calling ``step_parameter``, each parameter's fixed facts learned once), the write-back of a
16-bit parameter's fp32 result (:func:`write_back_of`), state dtypes kept through ``load_state_dict``, and
:func:`finish_update`, which completes a split step."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any, NamedTuple, Protocol, overload, runtime_checkable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lomo_lightning.layout import ShardLayout, flat_offset, is_distributed, local_tensor
from lomo_lightning.optim.kernels import Compile, check_compile, use_compile
from lomo_lightning.optim.rounding import Write, WriteBack, check_rounding, is_low_precision, key_word


@runtime_checkable
class FusableRule(Protocol):
    """A rule that updates one parameter by itself: what the fused engine calls inside backward.

    A stock ``torch.optim.Optimizer`` need not meet it: the engine then runs its ``step()`` narrowed
    to one parameter (:meth:`~lomo_lightning.FusedUpdater.step_parameter`).
    """

    def step_parameter(self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False) -> None:
        """Update ``param`` alone from ``grad`` with ``group``'s hyper-parameters; ``grad`` may be overwritten
        when ``grad_is_scratch``."""
        ...


@runtime_checkable
class SplitStepRule(FusableRule, Protocol):
    """A rule whose step needs sums over a whole sharded tensor, and can split it around them.

    ``begin_step_parameter`` is ``step_parameter`` as a generator. On a shard it yields its partial sums
    once (a 1-D fp32 tensor) and finishes when sent them summed over
    :func:`~lomo_lightning.layout.shard_group` (:func:`finish_update`); on FSDP2 shards the engine batches
    those collectives, one per unit. A whole tensor's sums are complete as they are: its update may run to
    its end at the first ``next()`` (:func:`run_update`). ``grad`` may be the local shard of a ``DTensor``
    parameter's gradient.
    """

    def begin_step_parameter(
        self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False
    ) -> Generator[Tensor, Tensor, None]: ...


class ParameterFacts(NamedTuple):
    """What a rule needs to know about one parameter that does not change between steps."""

    layout: ShardLayout  # where its whole-tensor statistics are completed
    offset: int  # the position of its local shard's first element in the whole flattened tensor (16-bit only)
    position: int  # its index among all parameters of all param groups (stochastic rounding's key)
    distributed: bool  # a DTensor: elementwise work runs on its local shard (asked each step: FSDP2 may replace it)
    low_precision: bool  # bf16/fp16: updated on an fp32 working copy and written back
    compiled: bool  # its update runs as compiled kernels (the rule's compile, resolved for its device and size)


class PerParameterOptimizer(Optimizer):
    """An optimizer whose step is separable per parameter.

    ``step()`` works unfused (``loss.backward(); optimizer.step()``); the fused engine calls
    :meth:`step_parameter` for one parameter at a time, inside backward, and lets it overwrite the gradient.

    A bf16/fp16 parameter is updated on an fp32 working copy, written back with the group's
    ``rounding`` (:mod:`lomo_lightning.optim.rounding`; ``"stochastic"`` draws its bits from the group's
    ``seed``, the parameter's step and its position in the param groups). The state stays in the dtype it
    was made in, also when loaded from a checkpoint. What is fixed about a parameter
    (:class:`ParameterFacts`) is learned once (:meth:`learn_facts`, which the fused engine calls when it
    attaches) and forgotten when the param groups change.

    ``compile`` (``"auto"``, ``True``, ``False``): run the per-parameter math as compiled kernels
    (:mod:`lomo_lightning.optim.kernels`); an attribute of the rule, not of its param groups (a checkpoint
    does not decide it).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any], compile: Compile = "auto"):
        self.compile = check_compile(compile, type(self).__name__)
        self._elements: int | None = None  # of all parameters, for compile="auto" (counted at the first step)
        defaults.setdefault("rounding", "stochastic")
        defaults.setdefault("seed", None)
        check_rounding(defaults["rounding"], type(self).__name__)
        if defaults["seed"] is None:
            defaults["seed"] = torch.initial_seed()
        super().__init__(params, defaults)
        keep_state_dtypes(self)
        self._facts: dict[Tensor, ParameterFacts] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_rounding(param_group.get("rounding", self.defaults["rounding"]), type(self).__name__)
        super().add_param_group(param_group)
        self._facts = {}  # positions moved
        self._elements = None

    def learn_facts(self, params: Iterable[Tensor]) -> None:
        """Learn the fixed facts of ``params`` now rather than at their first step."""
        for param in params:
            self.facts(param)

    def facts(self, param: Tensor) -> ParameterFacts:
        """The fixed facts of ``param``, learned at the first call (a rule's hot path reads ``self._facts`` first)."""
        known = self._facts.get(param)
        if known is not None:
            return known
        position = next((i for i, p in enumerate(p for group in self.param_groups for p in group["params"]) if p is param), None)
        if position is None:
            raise KeyError(f"{type(self).__name__}: the parameter of shape {tuple(param.shape)} is in none of its param groups.")
        low_precision = needs_write_back(param)
        facts = ParameterFacts(
            layout=ShardLayout.of(param),
            offset=flat_offset(param) if low_precision else 0,  # only a write-back's random bits need it
            position=position,
            distributed=is_distributed(param),
            low_precision=low_precision,
            compiled=self.compiles(param),
        )
        self._facts[param] = facts
        return facts

    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.step_parameter(param, param.grad, group)
        return loss

    def step_parameter(self, param: Tensor, grad: Tensor, group: dict[str, Any], *, grad_is_scratch: bool = False) -> None:
        """Update ``param`` alone from ``grad`` with the hyper-parameters of ``group``.

        ``grad_is_scratch=True``: the caller owns ``grad`` and frees it right after, so it may be overwritten.
        (:class:`FusableRule`; a rule that can split its step around a collective also meets :class:`SplitStepRule`.)
        """
        raise NotImplementedError

    def write_back(self, param: Tensor, group: dict[str, Any], state: dict[str, Any]) -> Write:
        """How the fp32 result for ``param`` (bf16/fp16) is written back; stochastic rounding keys its
        bits on ``state["step"]``, which the rule has advanced for this update. Runs once per update."""
        facts = self._facts.get(param) or self.facts(param)
        if group["rounding"] == "stochastic":
            word = key_word((group["seed"], int(state["step"]), facts.position))
            key = torch.tensor([word, facts.offset], dtype=torch.int64, device=param.device)
            return Write("stochastic", key, compile=facts.compiled)
        return write_back_of(param, group, state, step=0, position=facts.position, compile=facts.compiled)

    def compiles(self, param: Tensor) -> bool:
        """Whether ``param``'s update runs as compiled kernels (``compile``, resolved for its device and the
        rule's size)."""
        if self.compile != "auto":
            return self.compile
        if self._elements is None:
            self._elements = sum(p.numel() for group in self.param_groups for p in group["params"])
        return use_compile(self.compile, local_tensor(param).device, self._elements)

    def position(self, param: Tensor) -> int:
        """The index of ``param`` among all parameters of all param groups, in order."""
        return (self._facts.get(param) or self.facts(param)).position


def write_back_of(
    param: Tensor,
    group: dict[str, Any],
    state: dict[str, Any],
    *,
    step: int,
    position: int,
    like: Tensor | None = None,
    compile: bool = False,
) -> Write:
    """The write-back of ``param``'s update under ``group["rounding"]``; creates the state it needs.

    Stochastic rounding draws its bits from ``(group["seed"], step, position)`` and the elements'
    positions in the whole tensor; Kahan summation keeps ``state["kahan_comp"]``, shaped and placed like
    ``like`` (default: the parameter). ``compile``: the write runs as one compiled pass (bit-identical).
    """
    rounding = group["rounding"]
    if rounding == "kahan" and "kahan_comp" not in state:
        state["kahan_comp"] = torch.zeros_like(param if like is None else like)
    compensation = local_tensor(state["kahan_comp"]) if rounding == "kahan" else None
    offset = flat_offset(param) if rounding == "stochastic" else 0
    described = WriteBack(rounding, (group["seed"], step, position), offset=offset, compensation=compensation, compile=compile)
    return described.write(local_tensor(param).device)


def needs_write_back(param: Tensor) -> bool:
    """Whether ``param``'s update is computed on an fp32 working copy and written back (bf16/fp16)."""
    return is_low_precision(local_tensor(param))


def keep_state_dtypes(optimizer: Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep each state tensor's saved dtype.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to its parameter's
    dtype: fp32 statistics of a bf16 parameter would come back in bf16, and a resumed run would differ
    from an uninterrupted one. A pre-hook remembers the saved tensors, a post-hook puts back those
    whose dtype was changed (on the device the load chose).
    """
    saved: dict[str, Any] = {}

    def remember(_: Optimizer, state_dict: dict[str, Any]) -> None:
        saved["state"] = state_dict["state"]

    def restore(opt: Optimizer) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        for index, values in saved.pop("state", {}).items():
            if not isinstance(index, int) or index >= len(params):
                continue
            state = opt.state[params[index]]
            for key, value in values.items():
                loaded = state.get(key)
                if isinstance(value, Tensor) and isinstance(loaded, Tensor) and loaded.dtype != value.dtype:
                    state[key] = value.to(device=loaded.device)

    optimizer.register_load_state_dict_pre_hook(remember)
    optimizer.register_load_state_dict_post_hook(restore)


def run_update(update: Generator[Tensor, Tensor, None], layout: ShardLayout) -> None:
    """Run a split update (``begin_step_parameter``) to its end, completing its partial sums over ``layout``."""
    partial = next(update, None)
    if partial is not None:  # None: a whole tensor's update, which ran to its end
        finish_update(update, layout.sum_(partial))


def finish_update(update: Generator[Tensor, Tensor, None], sums: Tensor) -> None:
    """Send a split update (``begin_step_parameter``) its partial sums completed over the shard group."""
    try:
        update.send(sums)
    except StopIteration:
        return
    raise RuntimeError("a split update asked for a second collective")
