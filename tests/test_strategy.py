"""strategy="lomo": a Lightning run equals the plain FusedUpdater loop, resumes exactly, and refuses what cannot work."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import batches, tiny_llama
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from lomo_lightning import AdaLomo, DynamicLossScaler, FusedOptimizationMixin, FusedUpdater, LomoStrategy
from lomo_lightning.strategies import CHECKPOINT_KEY


def warmup_then_decay(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: [0.5, 1.0, 0.8, 0.6, 0.4, 0.2][min(step, 5)])


class TinyLM(LightningModule):
    """Automatic optimization: Lightning's own loop, the strategy fuses the update."""

    def __init__(self, model, scheduler: bool = False):
        super().__init__()
        self.model = model
        self.use_scheduler = scheduler
        self.seen_lrs: list[float] = []

    def compute_loss(self, batch):
        return self.model(**batch).loss

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def on_train_batch_start(self, batch, batch_idx):
        self.seen_lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self):
        optimizer = AdaLomo(self.parameters(), lr=1e-2, weight_decay=0.01)
        if not self.use_scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup_then_decay(optimizer), "interval": "step"}}


class TinyFusedLM(FusedOptimizationMixin, TinyLM):
    """Manual optimization through the mixin."""


def loader(data):
    return DataLoader(data, batch_size=None, shuffle=False)


def trainer(tmp_path=None, **kwargs):
    defaults = dict(
        accelerator="cpu",
        strategy="lomo",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    return Trainer(**{**defaults, **kwargs})


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def plain_loop(model, data, scheduler=False, forward_dtype=torch.float32, **updater_kwargs):
    optimizer = AdaLomo(model.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = warmup_then_decay(optimizer) if scheduler else None
    updater = FusedUpdater(model, optimizer, **updater_kwargs)
    for batch in data:
        with default_dtype(forward_dtype):  # what precision="bf16-true" does around forward
            loss = model(**batch).loss
        updater.backward(loss)
        if schedule is not None:
            schedule.step()
    return optimizer


def assert_same_parameters(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("module_cls", [TinyLM, TinyFusedLM], ids=["automatic", "mixin"])
def test_lightning_run_equals_plain_fused_loop(module_cls):
    data = batches(5)
    expected = tiny_llama()
    module = module_cls(copy.deepcopy(expected), scheduler=True)
    trainer(max_steps=5).fit(module, loader(data))
    plain_loop(expected, data, scheduler=True)
    assert_same_parameters(module.model, expected)
    assert module.seen_lrs == [5e-3, 1e-2, 8e-3, 6e-3, 4e-3], "the LR schedule must reach every step"


def test_trainer_gradient_clip_val_maps_to_two_pass_norm_clipping():
    data = batches(4)
    expected = tiny_llama()
    module = TinyLM(copy.deepcopy(expected))
    fit = trainer(max_steps=4, gradient_clip_val=0.05)
    fit.fit(module, loader(data))
    plain_loop(expected, data, clip_grad_norm=0.05)
    assert_same_parameters(module.model, expected)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    data = batches(3)
    start = tiny_llama()

    uninterrupted = TinyFusedLM(copy.deepcopy(start), scheduler=True)
    run = trainer(tmp_path / "full", max_epochs=2)
    run.fit(uninterrupted, loader(data))

    first = TinyFusedLM(copy.deepcopy(start), scheduler=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "first", max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, loader(data))
    resumed = TinyFusedLM(tiny_llama(seed=123), scheduler=True)  # different init: everything must come from the checkpoint
    second = trainer(tmp_path / "second", max_epochs=2)
    second.fit(resumed, loader(data), ckpt_path=checkpoint.last_model_path)

    assert second.global_step == run.global_step == 6
    for p, q in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(p, q)
    resumed_state = second.optimizers[0].state_dict()["state"]
    for index, state in run.optimizers[0].state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_state[index][key], value), (index, key)


def test_bf16_true_trains_bf16_parameters_like_the_plain_loop():
    data = batches(3)
    module = TinyLM(tiny_llama())
    expected = tiny_llama().to(torch.bfloat16)  # what precision="bf16-true" does to the module
    trainer(max_steps=3, precision="bf16-true").fit(module, loader(data))
    plain_loop(expected, data, forward_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in module.model.parameters())
    assert_same_parameters(module.model, expected)


def test_bf16_mixed_equals_the_plain_loop_under_autocast():
    data = batches(3)
    expected = tiny_llama()
    module = TinyLM(copy.deepcopy(expected))
    trainer(max_steps=3, precision="bf16-mixed").fit(module, loader(data))
    optimizer = AdaLomo(expected.parameters(), lr=1e-2, weight_decay=0.01)
    updater = FusedUpdater(expected, optimizer)
    for batch in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = expected(**batch).loss
        updater.backward(loss)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    assert_same_parameters(module.model, expected)


@pytest.mark.parametrize("module_cls", [TinyLM, TinyFusedLM], ids=["automatic", "manual"])
def test_gradient_accumulation_is_refused_with_the_reason(module_cls):
    with pytest.raises(ValueError, match="nothing is left to accumulate"):  # not Lightning's manual-optimization error
        trainer(max_steps=1, accumulate_grad_batches=2).fit(module_cls(tiny_llama()), loader(batches(2)))


def test_two_devices_on_the_single_device_strategy_is_refused():
    with pytest.raises(ValueError, match="lomo_ddp"):
        trainer(max_steps=1, devices=2).fit(TinyLM(tiny_llama()), loader(batches(1)))


def test_mixin_without_a_fused_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy='lomo'"):
        trainer(max_steps=1, strategy="auto").fit(TinyFusedLM(tiny_llama()), loader(batches(1)))


def test_strategy_instance_and_name_are_the_same_thing():
    data = batches(2)
    by_name = TinyLM(tiny_llama())
    by_instance = TinyLM(tiny_llama())
    trainer(max_steps=2).fit(by_name, loader(data))
    trainer(max_steps=2, strategy=LomoStrategy()).fit(by_instance, loader(data))
    assert_same_parameters(by_name.model, by_instance.model)


def test_16_mixed_scales_the_loss_in_the_engine_equals_the_plain_loop_and_checkpoints_the_scale(tmp_path):
    data = batches(3)
    expected = tiny_llama()
    module = TinyLM(copy.deepcopy(expected))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    # Trainer(precision="16-mixed") turns into bf16-mixed on CPU: pass the fp16 plugin (as on GPU) explicitly
    fp16 = MixedPrecision("16-mixed", "cpu")
    fit = trainer(tmp_path, max_steps=3, plugins=[fp16], enable_checkpointing=True, callbacks=[checkpoint])
    fit.fit(module, loader(data))
    assert fit.precision_plugin.scaler is not None, "Lightning's scaler, set aside during fit, is back for the next"

    optimizer = AdaLomo(expected.parameters(), lr=1e-2, weight_decay=0.01)
    updater = FusedUpdater(expected, optimizer, loss_scaler=DynamicLossScaler(scale=2.0**16))
    for batch in data:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = expected(**batch).loss
        assert updater.backward(loss)
    assert_same_parameters(module.model, expected)

    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    assert saved[CHECKPOINT_KEY]["loss_scaler"]["scale"] == 2.0**16
    assert saved[CHECKPOINT_KEY]["steps"] == 3


# The Lightning code FSDP2Strategy copies (its setup replaces a refusal with sharding, its setup_environment
# builds a 1-D mesh): the digests of the sources it mirrors, lightning 2.6.
MIRRORED_MODEL_PARALLEL = {"setup": "fdf402066d49c198", "setup_environment": "508f608433d9c45d"}


def test_fsdp2_strategy_still_mirrors_lightnings_model_parallel_strategy():
    import hashlib
    import inspect

    import lightning
    from lightning.pytorch.strategies import ModelParallelStrategy

    for name, digest in MIRRORED_MODEL_PARALLEL.items():
        source = inspect.getsource(getattr(ModelParallelStrategy, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, (
            f"lightning {lightning.__version__} changed ModelParallelStrategy.{name}: bring "
            f"lomo_lightning.strategies.fsdp.FSDP2Strategy.{name} in line with it, then update MIRRORED_MODEL_PARALLEL"
        )


def test_every_strategy_is_a_lightning_strategy_that_registers_itself():
    from lightning.fabric.strategies import _StrategyRegistry
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    from lomo_lightning.strategies import FSDP2Strategy, FusedStrategy, LomoDDPStrategy, LomoFSDPStrategy

    for cls in (LomoStrategy, LomoDDPStrategy, LomoFSDPStrategy, FSDP2Strategy):
        assert issubclass(cls, Strategy)
        assert StrategyRegistry[cls.strategy_name]["strategy"] is cls
        fresh = _StrategyRegistry()
        cls.register_strategies(fresh)
        assert list(fresh) == [cls.strategy_name], "each class registers its own name, not its parent's"
    assert all(issubclass(cls, FusedStrategy) for cls in (LomoStrategy, LomoDDPStrategy, LomoFSDPStrategy))
    assert not issubclass(FSDP2Strategy, FusedStrategy)
    assert StrategyRegistry["ddp"]["strategy"].__module__.startswith("lightning."), "Lightning's own names stay Lightning's"


class PlateauLM(TinyFusedLM):
    """ReduceLROnPlateau on a logged metric, which the mixin steps as Lightning's automatic loop would."""

    def __init__(self, model, monitor):
        super().__init__(model)
        self.plateau_monitor = monitor

    def configure_optimizers(self):
        optimizer = AdaLomo(self.parameters(), lr=1e-2)
        # mode="max" on a loss: the first epoch sets the best value, each later one is a plateau and halves the LR
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0, threshold=1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "interval": "epoch"}}


def test_the_mixin_steps_reduce_lr_on_plateau_on_the_metric_it_names():
    module = PlateauLM(tiny_llama(), monitor="train/loss")
    trainer(max_epochs=3).fit(module, loader(batches(2)))
    assert module.seen_lrs == [1e-2, 1e-2, 1e-2, 1e-2, 5e-3, 5e-3]
    with pytest.raises(ValueError, match="set plateau_monitor on PlateauLM to one of train/loss, .*it is 'val/missing'"):
        trainer(max_epochs=1).fit(PlateauLM(tiny_llama(), monitor="val/missing"), loader(batches(2)))
