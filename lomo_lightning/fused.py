"""The fused engine: :class:`FusedUpdater` runs the optimizer inside backward, one parameter at a time, and
frees each gradient at once; :class:`DynamicLossScaler` (fp16 loss scaling) and :class:`BackwardPass`
(what the hooks of one backward pass share) serve it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lomo_lightning._compat import mark_optimizer_stepped
from lomo_lightning.layout import is_distributed, local_tensor, shard_group
from lomo_lightning.optim.base import (
    FusableRule,
    PerParameterOptimizer,
    SplitStepRule,
    finish_update,
    keep_state_dtypes,
    needs_write_back,
    write_back_of,
)
from lomo_lightning.optim.kernels import Compile, check_compile, use_compile
from lomo_lightning.optim.rounding import check_rounding
from lomo_lightning.placement import Batch, Completion, OneDevice, Placement


@dataclass
class DynamicLossScaler:
    """fp16 loss scaling: back off on overflow, grow after ``growth_interval`` clean steps.

    The same policy as ``torch.amp.GradScaler``, kept as plain numbers because the fused engine learns
    about an overflow from the first (norm-measuring) backward pass, before any parameter has changed.
    """

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0
    clean_steps: int = 0

    def update(self, found_overflow: bool) -> None:
        if found_overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class BackwardPass:
    """What the hooks of one backward pass share: a new one for each pass.

    The norm-measuring pass (``measuring``) appends each parameter's gradient norm to ``norms`` and
    changes nothing else; the updating pass unscales (``inv_scale``), clips (``clip_coef``) and runs the
    rule. Without value clipping both scalings are one ``multiplier`` (``None``: nothing to scale), one
    pass over each gradient; with it, the gradient is unscaled, clamped, then scaled by ``clip_coef``.
    """

    measuring: bool = False
    inv_scale: float = 1.0
    clip_coef: Tensor | None = None
    multiplier: Tensor | float | None = None
    scales: bool = False  # the gradient is scaled or clamped before the rule: in fp32
    norms: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class FixedFacts:
    """What the engine's hook needs to know about one parameter and that does not change between steps.

    Computed when the engine attaches or refreshes, so that the hook only reads it.
    """

    group_index: int  # its param group
    position: int  # its index among all parameters of all param groups
    distributed: bool  # a DTensor (FSDP2): elementwise work runs on its local shard
    low_precision_grad: bool  # its gradient is bf16/fp16
    widen: bool  # ... and the rule works on an fp32 one, which the engine makes (a compiled kernel reads it as it is)
    low_precision: bool  # a bf16/fp16 parameter: a stock rule runs on an fp32 working copy of it
    completion: Completion | None  # the placement's completion of its gradient; None: final as it comes
    batch: Batch | None  # the placement's batch for a split step's collective; None: completed at once
    shard_group: Any  # the group a split step's partial sums are completed over when not batched (None: whole)
    compiled: bool  # a stock rule's write-back to it runs as one compiled pass


class FusedUpdater:
    """Moves an optimizer's update into backward: each parameter is updated as soon as its gradient is final.

    A ``register_post_accumulate_grad_hook`` on every trainable parameter runs the update rule for that
    parameter alone, with the current values of its param group (so LR schedulers act), then frees the
    gradient. Gradients never all exist together. Works with any optimizer whose ``step()`` is separable
    per parameter (SGD, AdamW, Adafactor, :class:`~lomo_lightning.Lomo`, :class:`~lomo_lightning.AdaLomo`).

    What only the whole backward pass can know is handled here:

    - global-norm clipping, as LOMO does it: a first backward pass (``retain_graph=True``) only measures
      the norm of the unclipped gradients, then the fused pass scales each gradient by the clip coefficient;
    - value clipping, in the hook, before norm scaling;
    - fp16 loss scaling (``loss_scaler``): the first pass also detects overflow, and an overflowing step
      changes no parameter. With fp16 trainable parameters (pure fp16, as LOMO trains) the engine
      scales the loss by itself when no ``loss_scaler`` is given;
    - a step whose loss is not finite is skipped before any parameter changes.

    A stock rule (AdamW, SGD, Adafactor, ...) on a bf16/fp16 parameter runs on an fp32 working copy of
    that one parameter, so its state is fp32, and the result is written back with ``rounding``
    (:mod:`lomo_lightning.optim.rounding`): one parameter in fp32 at a time. ``Lomo`` and ``AdaLomo``
    do this themselves, with their own ``rounding``.

    Example::

        updater = FusedUpdater(model, AdaLomo(model.parameters(), lr=1e-3), clip_grad_norm=1.0)
        for batch in loader:
            updater.backward(model(**batch).loss)   # forward, backward and update; no optimizer.step()

    Args:
        model: the module whose trainable parameters are updated.
        optimizer: the update rule; every parameter of ``model`` that requires grad must be in it.
        clip_grad_norm: clip the global gradient norm to this value (two backward passes).
        clip_grad_value: clamp every gradient entry to ``[-clip_grad_value, clip_grad_value]``.
        loss_scaler: dynamic loss scaling for fp16 training; by default one is made when a trainable
            parameter is fp16.
        rounding: how a stock rule's fp32 result reaches a bf16/fp16 parameter: ``"stochastic"``,
            ``"kahan"`` or ``"nearest"``; stored in every param group that has no ``rounding`` of its own
            (so it is checkpointed, and a group may choose its own).
        seed: seeds stochastic rounding's bits (default: ``torch.initial_seed()``); stored likewise.
            The bits of a write also depend on the engine's step count and the parameter's position.
        placement: where the parameters live (:mod:`lomo_lightning.placement`): when a gradient is
            final, what completes a norm, how ranks agree to skip a step. Default: one device.
        compile: ``"auto"``, ``True`` or ``False``: a stock rule's write-back to 16-bit parameters as one
            compiled pass (:mod:`lomo_lightning.optim.kernels`; bit-identical). Our rules take their own.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scaler: DynamicLossScaler | None = None,
        rounding: str | None = None,
        seed: int | None = None,
        placement: Placement | None = None,
        compile: Compile = "auto",
    ):
        self.compile = check_compile(compile, "FusedUpdater")
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and not value > 0:
                raise ValueError(f"FusedUpdater: {name} must be positive or None, got {value}.")
        # a rule that steps one parameter by itself (the protocol FusableRule), or a stock rule narrowed to it
        self._rule: FusableRule | None = optimizer if isinstance(optimizer, FusableRule) else None
        if isinstance(optimizer, PerParameterOptimizer):
            if rounding is not None or seed is not None:
                raise ValueError(
                    f"FusedUpdater: {type(optimizer).__name__} writes its 16-bit parameters back itself: "
                    f"pass rounding= and seed= to {type(optimizer).__name__}, not to the engine."
                )
        else:
            for group in optimizer.param_groups:
                check_rounding(group.setdefault("rounding", rounding or "stochastic"), "FusedUpdater")
                group.setdefault("seed", torch.initial_seed() if seed is None else seed)
        self.model = model
        self.optimizer = optimizer
        self.placement = placement if placement is not None else OneDevice()
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.loss_scaler = loss_scaler
        self.steps = 0
        self.skipped_steps = 0
        self.last_grad_norm: Tensor | None = None
        self._pass = BackwardPass()  # a new one for each backward pass
        self._handles: list[RemovableHandle] = []
        self._fixed: dict[Tensor, FixedFacts] = {}  # the trainable parameters (in order) and their fixed facts
        self._splits = isinstance(optimizer, SplitStepRule)
        self.refresh()
        if self.loss_scaler is None and any(local_tensor(p).dtype == torch.float16 for p in self._fixed):
            self.loss_scaler = DynamicLossScaler()  # fp16 gradients of an unscaled loss underflow
        if self._rule is None and any(facts.low_precision for facts in self._fixed.values()):
            keep_state_dtypes(optimizer)  # the fp32 state of 16-bit parameters must load as fp32

    # -- set-up ------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """(Re-)discover the trainable parameters, their fixed facts and their hooks, e.g. after a selection changed them."""
        self.remove()
        group_index = {p: i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        position = {p: i for i, p in enumerate(group_index)}
        trainable: list[Tensor] = []
        missing = []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if param not in group_index:
                missing.append(name)
                continue
            trainable.append(param)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"FusedUpdater: {len(missing)} parameters require grad but are not in the optimizer ({shown}). "
                "Their gradients would pile up unused: add them to the optimizer or set requires_grad=False."
            )
        self.placement.attach(self.model, trainable, split_steps=self._splits)
        elements = sum(p.numel() for p in trainable) if self.compile == "auto" else None
        if isinstance(self.optimizer, PerParameterOptimizer):
            self.optimizer.learn_facts(trainable)
        rule = self.optimizer

        def compiled_rule(param: Tensor) -> bool:
            return isinstance(rule, PerParameterOptimizer) and rule.facts(param).compiled

        self._fixed = {
            p: FixedFacts(
                group_index=group_index[p],
                position=position[p],
                distributed=is_distributed(p),
                low_precision_grad=local_tensor(p).dtype != torch.float32,
                widen=local_tensor(p).dtype != torch.float32 and not compiled_rule(p),
                low_precision=needs_write_back(p),
                completion=self.placement.completion(p),
                batch=self.placement.batch_of(p),
                shard_group=shard_group(p),
                compiled=use_compile(self.compile, local_tensor(p).device, elements),
            )
            for p in trainable
        }
        if self.placement.installs_hooks:
            self._handles = [p.register_post_accumulate_grad_hook(self.apply_gradient) for p in self._fixed]

    def remove(self) -> None:
        """Remove the hooks; the model and optimizer are left as ordinary, unfused objects."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def parameters(self) -> list[Tensor]:
        """The model parameters whose gradients the engine consumes."""
        return list(self._fixed)

    # -- one training step -------------------------------------------------------------------------

    def backward(self, loss: Tensor, retain_graph: bool = False) -> bool:
        """Backward and update. Returns ``False`` when the step was skipped (non-finite loss or fp16 overflow).

        ``retain_graph=True`` keeps the graph after the update pass, as ``Tensor.backward`` does.
        """
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        scaled = loss * scale if scale != 1.0 else loss
        clip_coef = None
        if self.clip_grad_norm is not None or self.loss_scaler is not None:
            # the norm pass changes no parameter: the loss's finiteness is agreed with the norm, one host sync
            norm, loss_finite, norm_finite = self._measure_grad_norm(scaled, loss.detach(), inv_scale=1.0 / scale)
            if not loss_finite:
                self.skipped_steps += 1
                return False
            self.last_grad_norm = norm
            if not norm_finite:
                if self.loss_scaler is not None:
                    self.loss_scaler.update(found_overflow=True)
                self.skipped_steps += 1
                return False
            if self.clip_grad_norm is not None:
                # the same coefficient as torch.nn.utils.clip_grad_norm_
                clip_coef = torch.clamp(self.clip_grad_norm / (norm + 1e-6), max=1.0)
        elif not self.loss_is_finite(loss.detach()):
            self.skipped_steps += 1
            return False
        multiplier = self._multiplier(1.0 / scale, clip_coef)
        scales = multiplier is not None or self.clip_grad_value is not None
        self._pass = BackwardPass(inv_scale=1.0 / scale, clip_coef=clip_coef, multiplier=multiplier, scales=scales)
        try:
            scaled.backward(retain_graph=retain_graph)
            self.placement.end_of_pass(measuring=False)
        finally:
            self._pass = BackwardPass()
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_overflow=False)
        self.steps += 1
        mark_optimizer_stepped(self.optimizer)  # what a wrapped optimizer.step() records; LR schedulers check it
        return True

    def _multiplier(self, inv_scale: float, clip_coef: Tensor | None) -> Tensor | float | None:
        """Unscaling and norm clipping as one factor (``None``: neither); value clipping keeps them apart."""
        if self.clip_grad_value is not None:
            return None
        if clip_coef is None:
            return inv_scale if inv_scale != 1.0 else None
        return clip_coef * inv_scale if inv_scale != 1.0 else clip_coef

    def _measure_grad_norm(self, scaled_loss: Tensor, loss: Tensor, inv_scale: float) -> tuple[Tensor, bool, bool]:
        """First pass: the global L2 norm of the (unscaled, unclipped) gradients; nothing is updated.

        Returns the norm, whether every process's loss is finite (agreed in the norm's own reduction) and
        whether the norm is finite (not: an fp16 overflow), both read with one host sync.
        """
        measuring = self._pass = BackwardPass(measuring=True)
        try:
            scaled_loss.backward(retain_graph=True)
            self.placement.end_of_pass(measuring=True)
        finally:
            self._pass = BackwardPass()
        norms = measuring.norms
        # the norm of the per-parameter norms, as torch.nn.utils.clip_grad_norm_ computes it
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else scaled_loss.new_zeros((), dtype=torch.float32)
        not_finite = torch.isfinite(loss).all().logical_not().to(norm.device, torch.float32)
        stats = self.placement.complete_norm(torch.stack([norm.square(), not_finite]))
        norm = stats[0].sqrt() * inv_scale
        losses_not_finite, norm_finite = torch.stack([stats[1], torch.isfinite(norm).to(torch.float32)]).tolist()
        return norm, losses_not_finite == 0.0, norm_finite == 1.0

    def loss_is_finite(self, loss: Tensor) -> bool:
        """Whether to take the step; under several processes every rank reaches the same answer."""
        return self.placement.all_finite(loss)

    # -- per parameter: the hot path, once per parameter per backward pass -------------------------

    def apply_gradient(self, param: Tensor, grad: Tensor | None = None) -> None:
        """Consume the final gradient of one model parameter: measure it, or scale it and run the rule.

        The post-accumulate-grad hook of every trainable parameter (``grad`` is then ``param.grad``,
        taken and freed); a placement that decides itself when gradients are final (DDP's communication
        hook) passes ``grad``. ``grad`` is owned by the engine from here on and may be overwritten.
        """
        if grad is None:
            grad, param.grad = param.grad, None
            if grad is None:
                return
        facts, now = self._fixed[param], self._pass
        with torch.no_grad():
            if facts.completion is not None:
                grad = facts.completion(grad, now.measuring)
                if grad is None:
                    return
            if now.measuring:
                now.norms.append(torch.linalg.vector_norm(local_tensor(grad) if facts.distributed else grad, dtype=torch.float32))
                return
            if facts.low_precision_grad and (facts.widen or now.scales):
                grad = grad.float()  # the one fp32 cast: rules take it as their working gradient
            values = local_tensor(grad) if facts.distributed else grad  # elementwise work on a shard: no DTensor dispatch
            if now.multiplier is not None:
                values.mul_(now.multiplier)
            elif self.clip_grad_value is not None:
                if now.inv_scale != 1.0:
                    values.mul_(now.inv_scale)
                values.clamp_(-self.clip_grad_value, self.clip_grad_value)
                if now.clip_coef is not None:
                    values.mul_(now.clip_coef)
            group = self.optimizer.param_groups[facts.group_index]
            if self._splits:  # the engine completes the partial sums of a split step, or defers them to the placement
                update = self.optimizer.begin_step_parameter(param, values, group, grad_is_scratch=True)  # type: ignore[attr-defined]
                partial = next(update, None)  # None: a whole tensor's update, which ran to its end
                if partial is None:
                    return
                if facts.batch is not None:
                    self.placement.defer(facts.batch, update, partial)
                    return
                if facts.shard_group is not None:
                    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=facts.shard_group)
                finish_update(update, partial)
                return
            if self._rule is not None:
                self._rule.step_parameter(param, grad, group, grad_is_scratch=True)
            else:
                self._step_alone(param, grad, group, facts)

    def _step_alone(self, target: Tensor, grad: Tensor, group: dict[str, Any], facts: FixedFacts) -> None:
        """Run a stock optimizer's ``step()`` on one parameter by narrowing its param groups for the call.

        A 16-bit parameter lends the rule an fp32 working copy of itself for the call (its state is made
        alongside, in fp32), and gets the result back through the group's rounding.
        """
        if not facts.low_precision:
            self._step_narrowed(target, grad.to(target.dtype), group)
            return
        low_precision = target.data
        target.data = low_precision.float()
        try:
            self._step_narrowed(target, grad, group)
            # after the rule's step: a stock rule creates its state when it finds none. Stock rules keep no
            # common step count, so stochastic rounding keys its bits on the engine's.
            state = self.optimizer.state[target]
            write_back = write_back_of(
                target, group, state, step=self.steps, position=facts.position, like=low_precision, compile=facts.compiled
            )
            write_back(local_tensor(low_precision), local_tensor(target.data))
        finally:
            target.data = low_precision

    def _step_narrowed(self, target: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        groups = self.optimizer.param_groups
        saved = [g["params"] for g in groups]
        target.grad = grad
        try:
            for g in groups:
                g["params"] = [target] if g is group else []
            self.optimizer.step()
        finally:
            for g, params in zip(groups, saved):
                g["params"] = params
            target.grad = None

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters and the loss scale (the rule's state lives in ``optimizer.state_dict()``)."""
        state: dict[str, Any] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]
        if self.loss_scaler is not None and "loss_scaler" in state:
            self.loss_scaler.load_state_dict(state["loss_scaler"])


__all__ = ["BackwardPass", "DynamicLossScaler", "FusedUpdater"]
