"""FusedUpdater: run the optimizer inside backward, one parameter at a time, and free each gradient at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lomo_lightning.optim.base import FusableRule, PerParameterOptimizer, keep_state_dtypes, needs_write_back, write_back_of
from lomo_lightning.optim.kernels import Compile, check_compile, use_compile
from lomo_lightning.optim.rounding import check_rounding
from lomo_lightning.placement import OneDevice, Placement, local_tensor


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


@dataclass(frozen=True)
class BackwardPass:
    """What the hooks of one backward pass need to know, set once before it starts.

    The norm-measuring pass (``measuring``) collects per-parameter norms and changes nothing; the
    updating pass unscales (``inv_scale``), clips (``clip_coef``) and runs the rule.
    """

    measuring: bool = False
    inv_scale: float = 1.0
    clip_coef: Tensor | None = None
    norms: list[Tensor] = field(default_factory=list)  # the measuring pass's per-parameter norms


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
        self._pass = BackwardPass()  # replaced, never changed, for each backward pass
        self._handles: list[RemovableHandle] = []
        self._trainable: dict[Tensor, None] = {}  # an ordered set: the parameters whose gradients are consumed
        self._group_index: dict[Tensor, int] = {}
        self._position: dict[Tensor, int] = {}
        self.refresh()
        if self.loss_scaler is None and any(local_tensor(p).dtype == torch.float16 for p in self._trainable):
            self.loss_scaler = DynamicLossScaler()  # fp16 gradients of an unscaled loss underflow
        if self._rule is None and any(needs_write_back(p) for p in self._trainable):
            keep_state_dtypes(optimizer)  # the fp32 state of 16-bit parameters must load as fp32

    # -- set-up ------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """(Re-)discover the trainable parameters and their hooks, e.g. after a selection changed them."""
        self.remove()
        self._group_index = {p: i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        self._position = {p: i for i, p in enumerate(self._group_index)}
        self._trainable = {}
        missing = []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if param not in self._group_index:
                missing.append(name)
                continue
            self._trainable[param] = None
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"FusedUpdater: {len(missing)} parameters require grad but are not in the optimizer ({shown}). "
                "Their gradients would pile up unused: add them to the optimizer or set requires_grad=False."
            )
        self.placement.attach(self)
        if self.placement.installs_hooks:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient_ready) for p in self._trainable]

    def remove(self) -> None:
        """Remove the hooks; the model and optimizer are left as ordinary, unfused objects."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def parameters(self) -> list[Tensor]:
        """The model parameters whose gradients the engine consumes."""
        return list(self._trainable)

    # -- one training step -------------------------------------------------------------------------

    def backward(self, loss: Tensor, retain_graph: bool = False) -> bool:
        """Backward and update. Returns ``False`` when the step was skipped (non-finite loss or fp16 overflow).

        ``retain_graph=True`` keeps the graph after the update pass, as ``Tensor.backward`` does.
        """
        if not self.loss_is_finite(loss.detach()):
            self.skipped_steps += 1
            return False
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        scaled = loss * scale if scale != 1.0 else loss
        clip_coef = None
        if self.clip_grad_norm is not None or self.loss_scaler is not None:
            norm = self._measure_grad_norm(scaled, inv_scale=1.0 / scale)
            self.last_grad_norm = norm
            if not torch.isfinite(norm):
                if self.loss_scaler is not None:
                    self.loss_scaler.update(found_overflow=True)
                self.skipped_steps += 1
                return False
            if self.clip_grad_norm is not None:
                # the same coefficient as torch.nn.utils.clip_grad_norm_
                clip_coef = torch.clamp(self.clip_grad_norm / (norm + 1e-6), max=1.0)
        self._pass = BackwardPass(inv_scale=1.0 / scale, clip_coef=clip_coef)
        try:
            scaled.backward(retain_graph=retain_graph)
            self.placement.end_of_pass(self, measuring=False)
        finally:
            self._pass = BackwardPass()
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_overflow=False)
        self.steps += 1
        # what a wrapped optimizer.step() would record; LR schedulers check it
        self.optimizer._opt_called = True  # type: ignore[attr-defined]
        return True

    def _measure_grad_norm(self, scaled_loss: Tensor, inv_scale: float) -> Tensor:
        """First pass: the global L2 norm of the (unscaled, unclipped) gradients; nothing is updated."""
        measuring = self._pass = BackwardPass(measuring=True)
        try:
            scaled_loss.backward(retain_graph=True)
            self.placement.end_of_pass(self, measuring=True)
        finally:
            self._pass = BackwardPass()
        norms = measuring.norms
        # the norm of the per-parameter norms, as torch.nn.utils.clip_grad_norm_ computes it
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else scaled_loss.new_zeros(())
        return self.placement.reduce_squared_norm(norm.square()).sqrt() * inv_scale

    def loss_is_finite(self, loss: Tensor) -> bool:
        """Whether to take the step; under several processes every rank reaches the same answer."""
        return self.placement.all_finite(loss)

    # -- per parameter (the hot path: runs once per parameter per backward) ------------------------

    @torch.no_grad()
    def _on_gradient_ready(self, param: Tensor) -> None:
        grad = param.grad
        param.grad = None
        if grad is not None:
            self.apply_gradient(param, grad)

    @torch.no_grad()
    def apply_gradient(self, param: Tensor, grad: Tensor) -> None:
        """Consume the final gradient of one model parameter: measure it, or clip it and run the rule.

        ``grad`` is owned by the engine from here on and may be overwritten. A placement that decides
        itself when gradients are final (DDP's communication hook) calls this.
        """
        final = self.placement.final_gradient(param, grad, measuring=self._pass.measuring)
        if final is None:
            return
        if self._pass.measuring:
            self._measure_gradient(final)
        else:
            self._update_parameter(param, final)

    def _measure_gradient(self, grad: Tensor) -> None:
        self._pass.norms.append(torch.linalg.vector_norm(local_tensor(grad), dtype=torch.float32))

    def _update_parameter(self, param: Tensor, grad: Tensor) -> None:
        settings = self._pass
        if grad.dtype != torch.float32:
            grad = grad.float()
        values = local_tensor(grad)  # elementwise work on a shard needs no DTensor dispatch
        if settings.inv_scale != 1.0:
            values.mul_(settings.inv_scale)
        if self.clip_grad_value is not None:
            values.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if settings.clip_coef is not None:
            values.mul_(settings.clip_coef)
        group = self.optimizer.param_groups[self._group_index[param]]
        self.placement.step(self, param, grad, group)

    def step_parameter(self, target: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """Run the rule on one tensor now (a placement may instead defer it and batch its collectives)."""
        if self._rule is not None:
            self._rule.step_parameter(target, grad, group, grad_is_scratch=True)
        else:
            self._step_alone(target, grad, group)

    def _step_alone(self, target: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """Run a stock optimizer's ``step()`` on one parameter by narrowing its param groups for the call.

        A 16-bit parameter lends the rule an fp32 working copy of itself for the call (its state is made
        alongside, in fp32), and gets the result back through the group's rounding.
        """
        if not needs_write_back(target):
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
                target, group, state, step=self.steps, position=self._position[target], like=low_precision,
                compile=use_compile(
                    self.compile, low_precision.device, sum(p.numel() for p in self._trainable) if self.compile == "auto" else None
                ),
            )  # fmt: skip
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
