"""What every fused strategy shares: install the engine after the model is set up, fuse backward, checkpoint it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lomo_lightning._compat import PathLike, grad_scaler_scale, trainer_of
from lomo_lightning.fused import DynamicLossScaler, FusedUpdater

if TYPE_CHECKING:
    from lomo_lightning._compat import StrategyRegistry

CHECKPOINT_KEY = "lomo_lightning"


class FusedStrategy(Strategy):
    """What every fused strategy shares: install the engine, route backward through it, keep it in checkpoints.

    A fused strategy is this class before a Lightning strategy in the bases (``class LomoStrategy(FusedStrategy,
    SingleDeviceStrategy)``): its overrides run first and hand the rest to the placement's strategy through
    ``super()``. ``optimizer_step`` only runs the closure: the update already happened inside backward.

    Lightning's hooks around backward run as documented: ``on_before_backward`` and ``on_after_backward``
    (of the module and the callbacks) before and after the fused backward, the precision plugin's
    ``pre_backward``/``post_backward`` around it, ``manual_backward(loss, retain_graph=True)`` keeps the
    graph. The hooks that assume gradients which exist together before an optimizer step cannot run:
    each parameter is updated inside backward and its gradient freed at once. A LightningModule that
    overrides ``backward``, ``on_before_optimizer_step`` or ``configure_gradient_clipping``, or a callback
    that overrides ``on_before_optimizer_step``, is refused when ``fit`` starts, with the reason (see
    :func:`refuse_hooks_without_gradients`). Clipping is the engine's (``Trainer(gradient_clip_val=...)``
    or the strategy's ``clip_grad_norm``); the norm it measured is ``fused_updater.last_grad_norm``.

    Args:
        clip_grad_norm: global-norm clipping (two backward passes).
        clip_grad_value: value clipping.
        **kwargs: the placement strategy's own arguments.
    """

    strategy_name: str
    description: str

    def __init__(self, *args: Any, clip_grad_norm: float | None = None, clip_grad_value: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.fused_updater: FusedUpdater | None = None
        self._restored_engine_state: dict[str, Any] | None = None
        self._lightning_scaler: Any = None  # Lightning's fp16 scaler, set aside while the engine scales

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        register_own_name(cls, strategy_registry)

    @override
    def connect(self, model: LightningModule) -> None:
        # before Lightning's own check, whose message for manual optimization does not say why
        if trainer_of(model) is not None:
            _refuse_accumulation(trainer_of(model))
        super().connect(model)

    @override
    def setup(self, trainer: Trainer) -> None:
        """The placement's setup (devices, wrapping or sharding, optimizers), then the engine on top of it."""
        super().setup(trainer)
        self._install_fused_updater(trainer)

    def _install_fused_updater(self, trainer: Trainer) -> None:
        """Validate the trainer configuration and install the engine on the set-up model."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        _refuse_accumulation(trainer)
        refuse_hooks_without_gradients(trainer)
        if len(self.optimizers) != 1:
            raise ValueError(
                f"Fused updates need exactly one optimizer from configure_optimizers, got {len(self.optimizers)}. "
                "Put all parameters in one optimizer, with param groups for different hyper-parameters."
            )
        clip_norm, clip_value = self._resolve_clipping(trainer)
        assert self.lightning_module is not None
        self.fused_updater = self.make_fused_updater(
            self.optimizers[0],
            clip_grad_norm=clip_norm,
            clip_grad_value=clip_value,
            loss_scaler=self._take_over_loss_scaling(),
        )
        if self._restored_engine_state is not None:
            self.fused_updater.load_state_dict(self._restored_engine_state)
            self._restored_engine_state = None

    def make_fused_updater(self, optimizer: Optimizer, **kwargs: Any) -> FusedUpdater:
        """The engine for this placement, over the LightningModule: a plain :class:`FusedUpdater` on one device."""
        assert self.lightning_module is not None
        return FusedUpdater(self.lightning_module, optimizer, **kwargs)

    def _resolve_clipping(self, trainer: Trainer) -> tuple[float | None, float | None]:
        """The strategy's own clipping, else ``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)``."""
        clip_norm, clip_value = self.clip_grad_norm, self.clip_grad_value
        if trainer.gradient_clip_val:
            if clip_norm is not None or clip_value is not None:
                raise ValueError("Set gradient clipping either on the Trainer or on the strategy, not on both.")
            algorithm = str(trainer.gradient_clip_algorithm or "norm").lower()
            if algorithm.endswith("norm"):
                clip_norm = float(trainer.gradient_clip_val)
            else:
                clip_value = float(trainer.gradient_clip_val)
        return clip_norm, clip_value

    def _take_over_loss_scaling(self) -> DynamicLossScaler | None:
        """With ``16-mixed``, the engine scales the loss itself: overflow is detected before any update.

        Lightning's scaler is set aside for the run and put back at teardown, so that the next ``fit()``
        of the same Trainer (HFT's stages) takes it over again. With ``16-true`` (fp16 parameters) there
        is no Lightning scaler: the engine makes its own.
        """
        precision = self.precision_plugin
        if not isinstance(precision, MixedPrecision) or precision.scaler is None:
            return None
        scaler = precision.scaler
        loss_scaler = DynamicLossScaler(
            scale=grad_scaler_scale(scaler),
            growth_factor=scaler.get_growth_factor(),
            backoff_factor=scaler.get_backoff_factor(),
            growth_interval=scaler.get_growth_interval(),
        )
        self._lightning_scaler, precision.scaler = scaler, None  # it would scale the loss a second time
        return loss_scaler

    # -- the training step -------------------------------------------------------------------------

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        """Lightning's backward with the update fused into it; ``retain_graph`` is the one argument it takes.

        ``manual_backward(loss, retain_graph=True)`` keeps the graph; any other argument of
        ``Tensor.backward`` (``gradient``, ``inputs``, ``create_graph``) would change which gradients the
        hooks receive, and is refused rather than dropped.
        """
        if self.fused_updater is None:
            raise RuntimeError("The fused engine is not installed: fused strategies train only inside Trainer.fit.")
        unsupported = [f"argument {i + 1}" for i in range(len(args))] + sorted(set(kwargs) - {"retain_graph"})
        if unsupported:
            raise TypeError(
                f"fused backward takes retain_graph only, got {', '.join(unsupported)}: the engine updates each "
                "parameter from the gradient of the loss alone, once per backward."
            )
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self.fused_updater.backward(closure_loss, retain_graph=bool(kwargs.get("retain_graph", False)))
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """Run the closure (forward and fused backward); there is nothing left to step."""
        return closure()

    # -- checkpoints -------------------------------------------------------------------------------

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: PathLike, storage_options: Any | None = None) -> None:
        if self.fused_updater is not None:
            checkpoint[CHECKPOINT_KEY] = self.fused_updater.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None:
            if self.fused_updater is not None:
                self.fused_updater.load_state_dict(state)
            else:
                self._restored_engine_state = state
        return checkpoint

    @override
    def teardown(self) -> None:
        if self.fused_updater is not None:
            self.fused_updater.remove()
            self.fused_updater = None
        if self._lightning_scaler is not None:
            precision = self.precision_plugin
            assert isinstance(precision, MixedPrecision)
            precision.scaler, self._lightning_scaler = self._lightning_scaler, None
        super().teardown()


# LightningModule hooks that need every gradient at once, before an optimizer step: why each cannot run
_MODULE_HOOKS_WITHOUT_GRADIENTS = {
    "backward": "the fused strategy runs backward itself (twice when clipping: a norm pass, then the update pass), "
    "with hooks that update each parameter; put work before or after it in on_before_backward/on_after_backward",
    "on_before_optimizer_step": "there is no moment with gradients before a step: each parameter is updated inside "
    "backward and its gradient freed at once; use on_after_backward, or fused_updater.last_grad_norm for the norm",
    "configure_gradient_clipping": "the engine clips, by the global norm it measures in a first backward pass: set "
    "Trainer(gradient_clip_val=...) or the strategy's clip_grad_norm / clip_grad_value",
}


def register_own_name(cls: type[Strategy], strategy_registry: StrategyRegistry) -> None:
    """Register ``cls.strategy_name`` (``Trainer(strategy="lomo")``) if ``cls`` names itself, not its parent's name.

    Registering again replaces this package's own entry (a reloaded module); a name that belongs to another
    package, Lightning above all, is refused: replacing it would silently change what ``strategy=<name>`` means.
    """
    name = cls.__dict__.get("strategy_name")
    if name is None:
        return
    owner = strategy_registry[name]["strategy"] if name in strategy_registry else None  # its get() instantiates
    if owner is not None and not owner.__module__.startswith("lomo_lightning."):
        raise ValueError(f"strategy name {name!r} already belongs to {owner.__module__}.{owner.__qualname__}: {cls.__name__} needs another")
    strategy_registry.register(name, cls, description=cls.__dict__["description"], override=True)


def refuse_hooks_without_gradients(trainer: Trainer) -> None:
    """Refuse a module or callback overriding a hook that fused updates cannot run, naming the hook and why."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.model_helpers import is_overridden

    module = trainer.lightning_module
    for hook, reason in _MODULE_HOOKS_WITHOUT_GRADIENTS.items():
        if is_overridden(hook, module, LightningModule):
            raise ValueError(f"{type(module).__name__}.{hook} cannot run under fused updates: {reason}.")
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by its callback connector
        if is_overridden("on_before_optimizer_step", callback, Callback):
            raise ValueError(
                f"the callback {type(callback).__name__} overrides on_before_optimizer_step, which cannot run under "
                f"fused updates: {_MODULE_HOOKS_WITHOUT_GRADIENTS['on_before_optimizer_step']}."
            )


def _refuse_accumulation(trainer: Trainer) -> None:
    if trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} cannot work with fused updates: each "
            "gradient is applied inside backward and freed at once, so nothing is left to accumulate. Use a "
            "larger batch instead (gradient checkpointing makes room for it), and set accumulate_grad_batches=1."
        )


def fused_updater_of(module: LightningModule) -> FusedUpdater:
    """The engine serving ``module``'s trainer, with a clear error when the strategy is not a fused one."""
    strategy = module.trainer.strategy
    updater = strategy.fused_updater if isinstance(strategy, FusedStrategy) else None
    if updater is None:
        raise ValueError(
            f"{type(module).__name__} trains with fused updates, but the trainer's strategy is "
            f"{type(strategy).__name__}: use Trainer(strategy='lomo') (or 'lomo_ddp', 'lomo_fsdp')."
        )
    return updater

