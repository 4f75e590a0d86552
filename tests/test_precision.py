"""16-bit parameters keep their updates: stochastic rounding is unbiased, Kahan summation compensates,
bf16 training tracks fp32 training, and pure fp16 scales its loss."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches, tiny_llama
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from test_strategy import TinyFusedLM, TinyLM, loader, trainer

from lomo_lightning import AdaLomo, FusedUpdater, Lomo
from lomo_lightning.optim.rounding import BLOCK, stochastic_round_

LOW = [torch.bfloat16, torch.float16]


def spread_values(dtype: torch.dtype, n: int = 96) -> torch.Tensor:
    """fp32 values between representable ones, over many binades (for fp16 also its subnormals)."""
    generator = torch.Generator().manual_seed(0)
    smallest = -30 if dtype == torch.float16 else -60
    exponents = torch.linspace(smallest, 14, n).round()
    values = (1 + torch.rand(n, generator=generator)) * torch.pow(2.0, exponents)
    values[::2] *= -1
    quarter_unit = torch.finfo(dtype).eps / 4  # a quarter of the spacing of values in [1, 2)
    just_above_powers_of_two = [2.0**-14 * (1 + quarter_unit), 1 + quarter_unit, -2 * (1 + 3 * quarter_unit)]
    values[-4:] = torch.tensor([*just_above_powers_of_two, 1e-3])
    return values


def neighbours(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values just below and just above each value (computed independently of the rounding)."""
    nearest = values.to(dtype)
    other = torch.nextafter(nearest, torch.where(nearest.float() < values, torch.inf, -torch.inf).to(dtype))
    return torch.minimum(nearest, other).float(), torch.maximum(nearest, other).float()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased_within_the_binomial_bound(dtype):
    values = spread_values(dtype)
    below, above = neighbours(values, dtype)
    assert (below < values).all() and (values < above).all(), "every value must lie between two representable ones"
    repeats = 4096
    rounded = torch.empty(repeats * values.numel(), dtype=dtype)
    stochastic_round_(rounded, values.repeat(repeats), key=(0, 1, 2))
    rounded = rounded.float().view(repeats, -1)

    assert ((rounded == below) | (rounded == above)).all(), "only the two neighbours may be chosen"
    p_up = ((values.double() - below.double()) / (above.double() - below.double()))
    ups = (rounded == above).sum(0).double()
    bound = 6 * (repeats * p_up * (1 - p_up)).sqrt() + 1  # 6 sigma of Binomial(repeats, p_up), every value
    assert ((ups - repeats * p_up).abs() <= bound).all(), (ups - repeats * p_up).abs().div(bound).max()
    mean = rounded.double().mean(0)
    assert ((mean - values.double()).abs() <= bound / repeats * (above - below).double()).all()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_representable_values_and_specials_are_returned_unchanged(dtype):
    bits = torch.randint(-(2**15), 2**15, (50_000,), dtype=torch.int16, generator=torch.Generator().manual_seed(0))
    values = torch.cat([bits.view(dtype), torch.tensor([0.0, -0.0, torch.inf, -torch.inf, torch.nan], dtype=dtype)])
    finfo = torch.finfo(dtype)
    values = torch.cat([values, torch.tensor([finfo.max, -finfo.max, finfo.tiny, finfo.smallest_normal / 4], dtype=dtype)])
    rounded = torch.empty_like(values)
    stochastic_round_(rounded, values.float(), key=(3,))
    same_bits = rounded.view(torch.int16) == values.view(torch.int16)
    assert (same_bits | (values.isnan() & rounded.isnan())).all()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_no_finite_value_rounds_to_infinity_unless_nearest_does(dtype):
    top = torch.finfo(dtype).max
    nan_patterns = torch.tensor([0x7FC00000, 0x7FFFFFFF, -1, -4194304], dtype=torch.int32).view(torch.float32)  # CUDA's NaN is 0x7FFFFFFF
    values = torch.cat([
        torch.tensor([top, -top]).repeat(1000) * (1 - torch.rand(2000) * 1e-3),  # just below the largest value
        torch.tensor([top * (1 + 2.0**-13)]).repeat(1000),  # above it, where nearest still gives it
        torch.tensor([torch.inf, -torch.inf]),
        nan_patterns,
    ])
    rounded = torch.empty(values.shape, dtype=dtype)
    stochastic_round_(rounded, values.clone(), key=(4,))
    nearest = values.to(dtype)
    assert torch.equal(rounded.isinf(), nearest.isinf()) and torch.equal(rounded.isnan(), nearest.isnan())
    assert torch.equal(rounded[-6:-4], nearest[-6:-4]), "infinities stay infinities with their sign"


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_a_shard_draws_the_bits_the_whole_tensor_draws_for_its_elements(dtype):
    values = torch.randn(BLOCK + BLOCK // 2 + 7) * 1e-2
    whole = torch.empty(values.shape, dtype=dtype)
    stochastic_round_(whole, values.clone(), key=(5, 6, 7))
    cut = BLOCK // 3  # not at a block boundary
    pieces = torch.empty(values.shape, dtype=dtype)
    for start, stop in [(0, cut), (cut, values.numel())]:
        stochastic_round_(pieces[start:stop], values[start:stop].clone(), key=(5, 6, 7), offset=start, numel=values.numel())
    assert torch.equal(whole.view(torch.int16), pieces.view(torch.int16))
    other = torch.empty(values.shape, dtype=dtype)
    stochastic_round_(other, values.clone(), key=(5, 6, 8))
    assert not torch.equal(whole, other), "another key must draw other bits"


# -- training ----------------------------------------------------------------------------------


def loss_gain(rounding: str | None, steps: int = 30) -> float:
    """Loss lowered by ``steps`` small AdaLomo steps on one batch, from the same bf16-representable start.

    ``rounding=None`` trains in fp32. Every model is evaluated in fp32, so only the training differs.
    """
    model = tiny_llama().to(torch.bfloat16)
    if rounding is None:
        model = model.float()
    batch = batches(1, batch_size=4, seq_len=32)[0]

    def fp32_loss() -> float:
        with torch.no_grad():
            return copy.deepcopy(model).float()(**batch).loss.item()

    start = fp32_loss()
    # lr 1e-3 relative to each tensor's RMS: most updates are below half a bf16 unit in the last place
    optimizer = AdaLomo(model.parameters(), lr=1e-3, rounding=rounding or "nearest", seed=0)
    updater = FusedUpdater(model, optimizer)
    for _ in range(steps):
        updater.backward(model(**batch).loss)
    return start - fp32_loss()


def test_bf16_with_stochastic_rounding_or_kahan_tracks_fp32_and_nearest_does_not():
    fp32 = loss_gain(None)
    assert fp32 > 0.01
    assert abs(loss_gain("stochastic") - fp32) < 0.1 * fp32
    assert abs(loss_gain("kahan") - fp32) < 0.05 * fp32
    assert loss_gain("nearest") < 0.7 * fp32, "round-to-nearest drops the updates smaller than half a unit"


RULES_ON_A_LINEAR_LOSS = {
    "lomo": lambda params, rounding: Lomo(params, lr=5e-6, rounding=rounding),
    "adalomo": lambda params, rounding: AdaLomo(params, lr=1e-4, rounding=rounding),
    "sgd": lambda params, rounding: torch.optim.SGD(params, lr=5e-6),
}


@pytest.mark.parametrize("rule", list(RULES_ON_A_LINEAR_LOSS))
def test_kahan_keeps_bf16_parameters_within_one_unit_of_the_fp32_run(rule):
    generator = torch.Generator().manual_seed(0)
    # magnitudes in [0.02, 0.06], moved by less than a fifth: the unit in the last place stays about the same
    magnitudes = 0.02 + 0.04 * torch.rand(64, 48, generator=generator)
    start = (magnitudes * torch.randn(64, 48, generator=generator).sign()).to(torch.bfloat16)
    # the gradient of the linear loss <w, direction>: bf16-representable, so both runs see the same one
    direction = torch.randn(64, 48, generator=generator).to(torch.bfloat16).float()

    def train(dtype: torch.dtype, rounding: str, steps: int = 200) -> torch.Tensor:
        weight = torch.nn.Parameter(start.to(dtype, copy=True))
        model = torch.nn.ParameterList([weight])
        if rule == "sgd":
            updater = FusedUpdater(model, RULES_ON_A_LINEAR_LOSS[rule]([weight], None), rounding=rounding)
        else:
            updater = FusedUpdater(model, RULES_ON_A_LINEAR_LOSS[rule]([weight], rounding))
        for _ in range(steps):
            updater.backward((weight.float() * direction).sum())
        return weight.detach()

    fp32 = train(torch.float32, "nearest")
    kahan = train(torch.bfloat16, "kahan")
    nearest = train(torch.bfloat16, "nearest")
    up = torch.nextafter(kahan, torch.full_like(kahan, torch.inf)).float() - kahan.float()
    down = kahan.float() - torch.nextafter(kahan, torch.full_like(kahan, -torch.inf)).float()
    unit = torch.maximum(up, down)  # one bf16 unit in the last place, per entry
    assert ((kahan.float() - fp32).abs() <= unit).all()
    moved = (fp32 - start.float()).abs()
    assert moved.mean() > 2 * unit.mean(), "the updates must add up to several units"
    assert (nearest.float() - fp32).abs().mean() > 0.5 * moved.mean(), "nearest loses most of them"


@pytest.mark.parametrize("rounding", ["stochastic", "kahan", "nearest"])
@pytest.mark.parametrize("rule", ["lomo", "adalomo"])
def test_fused_equals_unfused_bit_for_bit_in_bf16(rule, rounding):
    reference = tiny_llama(dtype=torch.bfloat16)
    fused = copy.deepcopy(reference)
    make = {"lomo": lambda p: Lomo(p, lr=0.05, rounding=rounding, seed=3), "adalomo": lambda p: AdaLomo(p, lr=1e-2, rounding=rounding, seed=3)}[rule]
    data = batches(3)
    optimizer = make(reference.parameters())
    for batch in data:
        reference(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    updater = FusedUpdater(fused, make(fused.parameters()))
    for batch in data:
        updater.backward(fused(**batch).loss)  # backward order: the parameters are written in another order
    for p, q in zip(reference.parameters(), fused.parameters()):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))


def test_stochastic_rounding_bits_follow_the_seed():
    def train(seed: int) -> list[torch.Tensor]:
        model = tiny_llama(dtype=torch.bfloat16)
        updater = FusedUpdater(model, AdaLomo(model.parameters(), lr=1e-3, seed=seed))
        for batch in batches(2):
            updater.backward(model(**batch).loss)
        return [p.detach() for p in model.parameters()]

    same, again, other = train(0), train(0), train(1)
    assert all(torch.equal(p, q) for p, q in zip(same, again))
    assert not all(torch.equal(p, q) for p, q in zip(same, other))


# -- stock rules on 16-bit parameters ----------------------------------------------------------


def test_stock_adamw_on_bf16_parameters_keeps_fp32_state_and_tracks_fp32():
    def gain(dtype: torch.dtype, rounding: str | None) -> tuple[float, torch.optim.Optimizer]:
        model = tiny_llama().to(torch.bfloat16).to(dtype)
        batch = batches(1, batch_size=4, seq_len=32)[0]
        evaluate = lambda: copy.deepcopy(model).float()(**batch).loss.item()  # noqa: E731
        with torch.no_grad():
            start = evaluate()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
        updater = FusedUpdater(model, optimizer, rounding=rounding)
        for _ in range(20):
            updater.backward(model(**batch).loss)
        with torch.no_grad():
            return start - evaluate(), optimizer

    fp32, _ = gain(torch.float32, None)
    stochastic, optimizer = gain(torch.bfloat16, "stochastic")
    nearest, _ = gain(torch.bfloat16, "nearest")
    assert all(s.dtype == torch.float32 for state in optimizer.state.values() for k, s in state.items() if k != "step")
    assert all(p.dtype == torch.bfloat16 for group in optimizer.param_groups for p in group["params"])
    assert abs(stochastic - fp32) < 0.15 * fp32
    assert nearest < 0.5 * fp32


def test_bad_rounding_and_rounding_given_to_the_wrong_object_are_clear_errors():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="rounding must be one of"):
        AdaLomo(params, rounding="truncate")
    with pytest.raises(ValueError, match="rounding must be one of"):
        Lomo([{"params": params, "rounding": "up"}])
    with pytest.raises(ValueError, match="pass rounding= and seed= to AdaLomo"):
        FusedUpdater(torch.nn.ParameterList(params), AdaLomo(params), rounding="kahan")


# -- Lightning: resume, fp16 loss scaling ------------------------------------------------------


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_bf16_true_resume_from_checkpoint_is_bit_identical(tmp_path, rounding):
    data = batches(3)

    class Module(TinyFusedLM):
        def configure_optimizers(self):
            return AdaLomo(self.parameters(), lr=1e-3, rounding=rounding)

    torch.manual_seed(11)  # the optimizer's default seed: the resumed run starts under another one
    uninterrupted = Module(tiny_llama())
    run = trainer(tmp_path / "full", max_epochs=2, precision="bf16-true")
    run.fit(uninterrupted, loader(data))

    torch.manual_seed(11)
    first = Module(tiny_llama())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "first", max_epochs=1, enable_checkpointing=True, callbacks=[checkpoint], precision="bf16-true").fit(
        first, loader(data)
    )
    resumed = Module(tiny_llama(seed=123))
    second = trainer(tmp_path / "second", max_epochs=2, precision="bf16-true")
    second.fit(resumed, loader(data), ckpt_path=checkpoint.last_model_path)

    assert second.global_step == run.global_step == 6
    for p, q in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q)
    expected = run.optimizers[0].state_dict()["state"]
    for index, state in second.optimizers[0].state_dict()["state"].items():
        for key, value in state.items():
            assert value.dtype == expected[index][key].dtype and torch.equal(value, expected[index][key]), (index, key)


class OverflowingLM(TinyLM):
    """Its loss is multiplied by ``factor``: large enough, and the scaled loss's gradients overflow."""

    factor = 1.0

    def compute_loss(self, batch):
        return self.model(**batch).loss * self.factor


class RecordEngine(Callback):
    """After every step: the engine's skipped-step count and loss scale."""

    def __init__(self):
        self.skipped: list[int] = []
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, *args):
        updater = trainer.strategy.fused_updater
        self.skipped.append(updater.skipped_steps)
        self.scales.append(updater.loss_scaler.scale if updater.loss_scaler is not None else 1.0)


def test_two_fits_under_16_mixed_both_scale_the_loss_and_skip_overflowing_steps():
    module = OverflowingLM(tiny_llama())
    record = RecordEngine()
    fit = trainer(max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu")], callbacks=[record])
    fit.fit(module, loader(batches(2)))
    assert record.scales == [2.0**16, 2.0**16] and record.skipped == [0, 0]

    before = copy.deepcopy(module.model.state_dict())
    module.factor = 1e30  # finite in fp32; scaled by 2^16, its fp16 gradients overflow
    fit.fit_loop.epoch_loop.max_steps = 4
    fit.fit(module, loader(batches(2)))
    assert record.skipped[2:] == [1, 2], "the second fit scales the loss too: its overflowing steps are skipped"
    assert record.scales[2:] == [2.0**15, 2.0**14]
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in before.items())


def test_16_true_scales_the_loss_and_skips_overflowing_steps():
    module = OverflowingLM(tiny_llama())
    module.factor = 1e3  # scaled by 2^16, the fp16 gradients overflow; by a smaller scale they fit
    record = RecordEngine()
    before = copy.deepcopy(module.model)
    fit = trainer(max_steps=10, precision="16-true", callbacks=[record])
    fit.fit(module, loader(batches(10)))
    assert all(p.dtype == torch.float16 for p in module.model.parameters())
    overflowed = record.skipped[-1]
    assert overflowed > 0 and record.scales[overflowed - 1] == 2.0 ** (16 - overflowed), "each overflow halves the scale"
    assert record.skipped[overflowed:] == [overflowed] * (10 - overflowed), "then the scaled steps go through"
    moved = max((p.float() - q.half().float()).abs().max().item() for p, q in zip(module.model.parameters(), before.parameters()))
    assert moved > 0 and all(torch.isfinite(p).all() for p in module.model.parameters())
