"""strategy="lomo_fsdp" and "lomo_ddp" on 2 gloo ranks equal one process on the same global batch.

One subprocess (``tests/distributed_runs.py``; Lightning launches its second rank) runs every case once;
the tests compare its files against single-process runs of the plain ``FusedUpdater`` made here.
Case names read ``<placement>_<rule>_<flags>``:

- ``clip``: two-pass global-norm clipping; ``hft``: half frozen (``resample``: a new mask after every step);
  ``sft``: sparse deltas, replicated (``ag``: accumulated-gradient regrowth, else SM3's, with the ``sm3`` rule;
  ``resel``: prune and regrow after steps 1 and 4); ``tie``: tied embeddings; ``nan``: rank 1's loss is NaN at step 2; ``odd``: 37 MLP channels
  (uneven shards); ``unused``: a trainable parameter without gradient, last in its FSDP unit; ``chunked``:
  the loss of ``chunked_causal_lm_loss`` (the one-process reference uses the model's own loss); ``dpo``: the DPO
  loss on pairs (``ipo``: IPO), each rank holding its share of the pairs, both sides; ``reference``: DPOModule on a
  preference data module, which computes the reference log-probabilities on both ranks;
- ``manual``: ``configure_model`` applies ``fully_shard`` itself; ``mixin``: ``FusedOptimizationMixin``;
- ``save``/``resume``/``long``: distributed checkpoint (``full``: one full checkpoint file from rank 0);
  ``export``: consolidated ``save_pretrained``;
- ``bf16``: ``precision="bf16-mixed"`` (FSDP2 ``MixedPrecisionPolicy``); ``bf16true``: bf16 shards;
  ``proj``: ``LomoFSDPStrategy(unit="projection")``, an FSDP2 unit per weight matrix (the default ``auto`` takes a block here).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import preference_pairs, tiny_llama
from datasets import Dataset
from distributed_runs import (
    CLIP,
    RULES,
    STEPS,
    RandomPreferencePairs,
    add_unused_parameter,
    case_loss,
    compiled_rule,
    global_batches,
    global_pair_batches,
    intermediate_size,
    make_sft,
    named_state,
    parse,
)
from torch.nn.parallel import DistributedDataParallel

from lomo_lightning import SM3, AdaLomo, FusedUpdater, HalfFineTuning, SparseFineTuning, apply_sparse_delta
from lomo_lightning.data import PreferenceCollator
from lomo_lightning.objectives import reference_log_probs
from lomo_lightning.selection.sft import merge_sparse_deltas
from lomo_lightning.strategies import LomoDDPStrategy, ReplicatedFusedUpdater, ShardedFusedUpdater

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).parent
EXACT = [
    "fsdp_adalomo_save",  # also the first half of the resume case
    "fsdp_lomo",
    "fsdp_adalomo_clip",
    "fsdp_lomo_clip_tie",  # tied embeddings: one shared parameter, updated once
    "fsdp_adalomo_hft",
    "fsdp_lomo_manual",  # configure_model() applied fully_shard itself; manual optimization (mixin)
    "ddp_adalomo",
    "ddp_lomo_mixin",
    "ddp_adalomo_clip",
    "ddp_lomo_clip_tie",
    "ddp_adalomo_hft",
    "ddp_sftadamw_sft_ag_resel",  # the values are DDP parameters; AG's statistics averaged over the ranks
    "ddp_sm3_sft_resel",  # SpIEL-MA: SM3's accumulators from the averaged gradients of the values
    "fsdp_sm3_sft_resel",  # replicated values, their gradients averaged by the engine; W0 sharded
    "fsdp_sftadamw_sft_ag_resel_save",  # accumulated-gradient regrowth; also the first half of a resume case
    "fsdp_lomo_sft_ag_clip",  # the norm of the replicated values' gradients counted once
    "fsdp_adalomo_odd",  # rows and columns that do not split evenly over the ranks
    "fsdp_adalomo_clip_tie_chunked",  # the chunked loss through FSDP2's root: its parameters gathered, one hook each
    "ddp_adalomo_chunked",
    "fsdp_adalomo_unused",  # the last parameter of a block gets no gradient: its batched collective still runs
    "fsdp_sm3_sft_resel_odd",
    "ddp_adalomo_dpo_clip",  # DPO: each rank holds its pairs, chosen and rejected rows together
    "fsdp_adalomo_dpo_clip_tie_chunked",
    "fsdp_lomo_dpo_hft_ipo",
    "fsdp2_adamw",  # the unfused baseline (strategy="lomo_fsdp_unfused", the app's method=adamw strategy=fsdp): AdamW on FSDP2
    "fsdp_adalomo_clip_tie_chunked_proj",  # an FSDP2 unit per projection: statistics and norm over smaller units
    "fsdp_sm3_sft_resel_proj",  # sparse-delta projections as units, their values replicated inside them
]
OTHERS = [  # in order: a resume case follows the case that saved its checkpoint
    "ddp_adalomo_reference",
    "fsdp_adalomo_reference",
    "fsdp_adalomo_hft_resample",
    "fsdp_adalomo_resume",
    "fsdp_adalomo_save_full",
    "fsdp_adalomo_resume_full",
    "fsdp_adalomo_long_export",
    "fsdp_adalomo_bf16",
    "fsdp_adalomo_bf16true",
    "fsdp_adalomo_nan",
    "ddp_lomo_nan",
    "fsdp_sftadamw_sft_ag_resel_resume",  # resumes mid-window: the candidates' sums come from the checkpoint
    "fsdp_sftadamw_sft_ag_resel_save_full",
    "fsdp_sftadamw_sft_ag_resel_resume_full",
    "fsdp_sftadamw_sft_ag_resel_long_export",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, str(TESTS / "distributed_runs.py"), str(out), *EXACT, *OTHERS],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return out


def result(runs: Path, case: str) -> dict:
    return torch.load(runs / f"{case}.pt", weights_only=False)


def one_process(case: str, steps: list[int] | None = None):
    """The same case on one process, the whole global batch per step: the model, its optimizer, the engine, SFT."""
    spec = parse(case)
    model = tiny_llama(tie="tie" in spec["flags"], intermediate=intermediate_size(spec["flags"]))
    if "unused" in spec["flags"]:
        add_unused_parameter(model)
    if "hft" in spec["flags"]:
        HalfFineTuning(ratio=0.5, seed=0).apply(model)
    sft = make_sft(spec["flags"])
    if sft is not None:
        optimizer = RULES[spec["rule"]](sft.apply(model).parameters())
    else:
        optimizer = RULES[spec["rule"]]([p for p in model.parameters() if p.requires_grad])
    updater = FusedUpdater(model, optimizer, clip_grad_norm=CLIP if "clip" in spec["flags"] else None)
    if "dpo" in spec["flags"]:
        data = global_pair_batches(tiny_llama(tie="tie" in spec["flags"], intermediate=intermediate_size(spec["flags"])))
    else:
        data = global_batches()
    order = steps if steps is not None else list(range(STEPS)) * (2 if {"long", "resume"} & spec["flags"] else 1)
    for index in order:
        assert updater.backward(case_loss(model, data[index], spec["flags"] - {"chunked"}))
        if sft is not None:
            sft.step(optimizer)  # what SFTReselectionCallback does
    return model, optimizer, updater, sft


def max_difference(params: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    expected = model.state_dict()
    assert params.keys() == expected.keys()
    return max((params[name] - expected[name]).abs().max().item() for name in params)


@pytest.mark.parametrize("case", EXACT)
def test_two_ranks_equal_one_process_on_the_global_batch(runs, case):
    got = result(runs, case)
    model, optimizer, updater, sft = one_process(case)
    assert got["global_step"] == STEPS and got["skipped_steps"] == 0
    untrained = tiny_llama(tie="tie" in case, intermediate=intermediate_size(parse(case)["flags"]))
    if "unused" in case:
        add_unused_parameter(untrained)
    if sft is not None:
        make_sft(parse(case)["flags"]).apply(untrained)
    assert max_difference(got["params"], untrained) > 5e-4, "training must move the parameters"
    assert max_difference(got["params"], model) < 1e-5
    if "clip" in case:
        assert updater.last_grad_norm > CLIP, "the case must exercise clipping"
    if sft is not None:
        assert_same_sparse_state(got, case, model, sft, optimizer)


def assert_same_sparse_state(got: dict, case: str, model: torch.nn.Module, sft: SparseFineTuning, optimizer) -> None:
    """The active entries, an open window's statistics and the values' optimizer state equal one process's."""
    flags = parse(case)["flags"]
    untrained = tiny_llama(intermediate=intermediate_size(flags))
    initial = {name: layer.indices.clone() for name, layer in make_sft(flags).apply(untrained).layers.items()}
    moved = 0
    for name, layer in sft.layers.items():
        indices = got["params"][f"{name}.indices"]
        assert torch.equal(indices, layer.indices), f"{name}: another active set"
        moved += not torch.equal(indices, initial[name])
    assert got["sft"]["windows"].keys() == sft.windows.keys()
    for name, window in sft.windows.items():
        saved = got["sft"]["windows"][name]
        assert torch.equal(saved["candidates"], window.candidates) and saved["samples"] == window.samples, name
        torch.testing.assert_close(saved["grad_sum"], window.grad_sum, rtol=1e-5, atol=1e-10)
    if sft.config.reselection_steps <= STEPS:
        assert moved == len(initial), "every layer must have pruned and regrown entries"
    for name, state in named_state(model, optimizer).items():
        for key, value in state.items():
            torch.testing.assert_close(got["optim"][name][key], value, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name}.{key}: {m}")


@pytest.mark.parametrize("case", ["fsdp_adalomo_save", "fsdp_adalomo_odd"])
def test_fsdp_adalomo_state_is_exactly_the_unsharded_state(runs, case):
    got = result(runs, case)["optim"]
    model, optimizer, _, _ = one_process(case)
    names = {param: name for name, param in model.named_parameters()}
    assert len(got) == len(optimizer.state)
    for param, state in optimizer.state.items():
        for key, value in state.items():
            torch.testing.assert_close(got[names[param]][key], value, rtol=1e-5, atol=1e-12, msg=lambda m: f"{key}: {m}")


def test_gradients_do_not_pile_up(runs):
    fsdp = result(runs, "fsdp_adalomo_save")
    assert fsdp["leftover_grad_bytes"] == 0, "every shard's gradient is freed by its update"
    ddp = result(runs, "ddp_adalomo")
    trainable = sum(p.numel() * 4 for p in tiny_llama().parameters())
    # what is left are DDP's own buckets (the gradients are views of them), zeroed for the next step
    assert ddp["leftover_grad_bytes"] <= trainable and ddp["leftover_grads_zero"]


def assert_bit_identical(resumed: dict, uninterrupted: dict) -> None:
    """A run resumed from its checkpoint at step STEPS ends where the uninterrupted run does, to the bit."""
    assert resumed["global_step"] == uninterrupted["global_step"] == 2 * STEPS
    for name, value in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    for key, state in uninterrupted["optim"].items():
        for field, value in state.items():
            assert torch.equal(resumed["optim"][key][field], value), (key, field)


@pytest.mark.parametrize("kind", ["", "_full"], ids=["sharded_dcp", "full_on_rank0"])
def test_resume_from_checkpoint_equals_uninterrupted(runs, kind):
    checkpoint = runs / f"fsdp_adalomo_save{kind}-ckpt" / "last.ckpt"
    if kind:  # LomoFSDPStrategy(save_distributed_checkpoint=False): one ordinary file with the full state
        assert checkpoint.is_file()
    else:
        assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2, "one shard file per rank"
    resumed, uninterrupted = result(runs, f"fsdp_adalomo_resume{kind}"), result(runs, "fsdp_adalomo_long_export")
    assert_bit_identical(resumed, uninterrupted)
    model, _, _, _ = one_process("fsdp_adalomo_long_export")
    assert max_difference(uninterrupted["params"], model) < 1e-5


def test_consolidated_export_is_a_plain_hugging_face_model(runs):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(runs / "fsdp_adalomo_long_export-hf")
    trained = result(runs, "fsdp_adalomo_long_export")["params"]
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_adalomo_state_per_rank_is_sharded(runs):
    per_rank = result(runs, "fsdp_adalomo_save")["state_bytes"]
    _, optimizer, _, _ = one_process("fsdp_adalomo_save")
    whole = sum(v.numel() * 4 for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    # row statistics, column statistics (by chunks of columns) and 1-D state are all split over the ranks
    expected = 0
    for param in optimizer.state:
        if param.dim() >= 2:
            expected += (math.ceil(param.shape[0] / 2) + math.ceil(param[0].numel() / 2)) * 4
        else:
            expected += math.ceil(param.numel() / 2) * 4
    assert per_rank == [expected, expected]
    assert expected / whole == pytest.approx(0.5, abs=0.01)


def test_bf16_mixed_runs_bf16_compute_on_fp32_master_shards(runs):
    got = result(runs, "fsdp_adalomo_bf16")
    model, _, _, _ = one_process("fsdp_adalomo_bf16")
    assert got["dtypes"] == ["torch.float32"], "sharded parameters (the master weights) stay fp32"
    difference = max_difference(got["params"], model)
    assert 0 < difference < 5e-3, "bf16 forward/backward differs from fp32 by rounding only"


def test_bf16_true_trains_bf16_shards(runs):
    got = result(runs, "fsdp_adalomo_bf16true")
    model, _, _, _ = one_process("fsdp_adalomo_bf16true")
    assert got["dtypes"] == ["torch.bfloat16"] and got["global_step"] == STEPS
    # bf16 parameters, bf16 gradient reduction: close to fp32 training, not equal
    assert max((got["params"][k].float() - v).abs().max().item() for k, v in model.state_dict().items()) < 2e-2


@pytest.mark.parametrize("case", ["fsdp_adalomo_nan", "ddp_lomo_nan"])
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(runs, case):
    got = result(runs, case)
    assert got["skipped_steps"] == 1
    model, _, _, _ = one_process(case, steps=[0, 2])
    assert max_difference(got["params"], model) < 1e-5


@pytest.mark.parametrize("case", ["ddp_adalomo_reference", "fsdp_adalomo_reference"])
def test_every_rank_holds_the_reference_log_probs_of_one_process(runs, case, tmp_path):
    """Each rank computes a share of the batches; all ranks end up with one process's values, cached once."""
    got = result(runs, case)
    assert got["global_step"] == 2
    for split, (count, seed) in {"train": (RandomPreferencePairs.TRAIN, 3), "val": (RandomPreferencePairs.VAL, 4)}.items():
        pairs = Dataset.from_list(preference_pairs(count, seed=seed))
        expected = reference_log_probs(  # with the module's default loss chunking ("auto"), which keys the cache
            tiny_llama(), pairs, PreferenceCollator(0), batch_size=RandomPreferencePairs.BATCH, cache_dir=tmp_path,
            chunk_tokens="auto",
        )
        for rank_values in got["per_rank"]:
            assert torch.equal(rank_values[split], expected), split
    cached = list((runs / f"{case}-cache" / "reference_logps").glob("*.safetensors"))
    assert sorted(path.name for path in cached) == sorted(path.name for path in (tmp_path / "reference_logps").glob("*.safetensors"))


def test_hft_resampled_every_step_under_fsdp_equals_one_process(runs):
    model = tiny_llama()
    hft = HalfFineTuning(ratio=0.5, seed=0)
    hft.apply(model)
    optimizer = RULES["adalomo"](model.parameters())
    updater = FusedUpdater(model, optimizer)
    for batch in global_batches():
        updater.backward(model(**batch).loss)
        hft.resample(model, optimizer=optimizer)  # what HFTResampleCallback(every_n_steps=1) does
        updater.refresh()
    assert max_difference(result(runs, "fsdp_adalomo_hft_resample")["params"], model) < 1e-5


def test_ddp_refuses_a_trainable_set_that_changes_after_wrapping(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        hft = HalfFineTuning(ratio=0.5, seed=0)
        hft.apply(model)
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
        updater = ReplicatedFusedUpdater(ddp, AdaLomo(model.parameters()))
        hft.resample(model)
        with pytest.raises(NotImplementedError, match="resample under strategy='lomo_fsdp'"):
            updater.refresh()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["", "_full"], ids=["sharded_dcp", "full_on_rank0"])
def test_sparse_fine_tuning_resumes_exactly_under_fsdp(runs, kind):
    case = "fsdp_sftadamw_sft_ag_resel_long_export"
    resumed, uninterrupted = result(runs, f"fsdp_sftadamw_sft_ag_resel_resume{kind}"), result(runs, case)
    assert_bit_identical(resumed, uninterrupted)  # the values, the indices and their optimizer state
    assert resumed["sft"]["completed_steps"] == uninterrupted["sft"]["completed_steps"] == 2 * STEPS
    model, optimizer, _, sft = one_process(case)
    assert max_difference(uninterrupted["params"], model) < 1e-5
    assert_same_sparse_state(uninterrupted, case, model, sft, optimizer)


def test_sparse_delta_and_consolidated_export_from_shards_rebuild_the_trained_model(runs):
    from transformers import AutoModelForCausalLM

    case = "fsdp_sftadamw_sft_ag_resel_long_export"
    trained = tiny_llama()
    make_sft(parse(case)["flags"]).apply(trained)
    trained.load_state_dict(result(runs, case)["params"])
    expected = merge_sparse_deltas(trained, trained.state_dict())  # the plain model it computes as
    model = tiny_llama()
    apply_sparse_delta(model, runs / f"{case}-delta.safetensors")
    assert max_difference(expected, tiny_llama()) > 5e-4
    assert max_difference(expected, model) == 0  # W0 + delta, added the same way
    exported = AutoModelForCausalLM.from_pretrained(runs / f"{case}-hf")
    assert max_difference(expected, exported) == 0


def test_fsdp_refuses_sparse_values_sharded_by_fully_shard(tmp_path):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        SparseFineTuning(density=0.01).apply(model)
        fully_shard(model)  # without ignored_params=replicated_parameters(model)
        with pytest.raises(ValueError, match="ignored_params"):
            ShardedFusedUpdater(model, SM3(model.parameters()))
    finally:
        dist.destroy_process_group()


def test_ddp_refuses_gradients_outside_its_buckets():
    with pytest.raises(ValueError, match="gradient_as_bucket_view"):
        LomoDDPStrategy(gradient_as_bucket_view=False)


def test_strategies_are_registered_by_name():
    from lightning.pytorch.strategies import StrategyRegistry

    assert {"lomo", "lomo_ddp", "lomo_fsdp", "lomo_fsdp_unfused"} <= set(StrategyRegistry)
    assert StrategyRegistry["lomo_fsdp"]["strategy"].strategy_name == "lomo_fsdp"


def test_the_unfused_fsdp2_baseline_shards_adamw_state(runs):
    """strategy="lomo_fsdp_unfused" (the app's method=adamw strategy=fsdp) is FSDP2: each rank holds half of AdamW's moments."""
    got = result(runs, "fsdp2_adamw")
    whole = sum(2 * p.numel() * p.element_size() for p in got["params"].values())  # exp_avg and exp_avg_sq
    assert all(size < 0.6 * whole for size in got["state_bytes"]), (got["state_bytes"], whole)


@pytest.mark.compiled
def test_sharded_compiled_adalomo_equals_one_process_compiled(tmp_path):
    """Shards = one process with compilation on: FSDP2 (2 gloo ranks, uneven shards) against the whole batch on one
    process, both ``compile=True`` (a run of its own, without Lightning: ``distributed_runs.py --compiled``)."""
    env = {key: value for key, value in os.environ.items() if key not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, str(TESTS / "distributed_runs.py"), "--compiled", str(tmp_path)],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    got = torch.load(tmp_path / "fsdp_adalomo_compiled.pt")
    model = tiny_llama(intermediate=37)
    updater = FusedUpdater(model, compiled_rule(model.parameters()))
    for batch in global_batches():
        assert updater.backward(model(**batch).loss)
    assert max_difference(got, tiny_llama(intermediate=37)) > 5e-4, "training must move the parameters"
    assert max_difference(got, model) < 1e-5  # what the eager shards meet (test_two_ranks_equal_one_process_on_the_global_batch)
