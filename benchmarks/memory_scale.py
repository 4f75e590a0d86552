"""Peak training memory of LLaMA-7B to 65B on a CPU, without allocating it: fake tensors + MemTracker.

    python benchmarks/memory_scale.py --jobs 4         # every size x method, the checks, 65B per rank on 8 ranks
    python benchmarks/memory_scale.py --sizes 7b --methods lomo adamw --full-depth 7b:lomo --fsdp-sizes
    python benchmarks/memory_scale.py --batch 1 --seq 2048 --tag seq2048    # another setting

Under ``FakeTensorMode`` a tensor has a shape, a dtype and a storage size but no data, so a training step of a 65B
model runs in a few GiB of host memory; MemTracker sees every allocation and free and keeps the peak of the live
bytes by category. The model is Hugging Face's ``LlamaForCausalLM`` with LLaMA-1 shapes; each method is built as
``lomo-train`` builds it (``harness.methods.build`` from ``conf/``, gradient clipping off), except AdamW and SGD,
whose rule from ``conf/`` runs as standard mixed precision (fp32 master weights, as the LOMO paper counts them),
and the floor and LoRA (the harness's). On a tiny model the fake figure equals the real one byte for byte
(``tests/test_memory_scale.py``).

Depth: the blocks are identical, so past a few blocks the peak grows by the same bytes per block. Each size and
method is measured at a few depths (1, 2, 4 blocks; HFT, whose frozen matrices differ from block to block, 4, 6,
8; FSDP2 2, 4, 6) and the line through the two deepest is evaluated at the real depth; ``--full-depth`` checks it.
A MemTracker figure leaves out what a GPU adds: the CUDA context, the allocator's rounding and fragmentation,
workspaces and communication buffers.

Per rank: FSDP2 (``shard_transformers``, as ``strategy="lomo_fsdp"``) over a fake process group of 8 ranks in this
one process, ``ShardedFusedUpdater``; the figure is what rank 0 holds (FSDPMemTracker tells sharded from gathered).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from harness import env, memory, methods, readme
from harness.env import RESULTS, gib
from torch import Tensor, nn

GIB = 2**30
# LLaMA-1 (Touvron et al., 2023, Table 2): vocabulary 32000, untied embeddings, SwiGLU, RMSNorm, multi-head attention.
LLAMA1 = {
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32),
    "13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40),
    "30b": dict(hidden=6656, intermediate=17920, layers=60, heads=52),
    "65b": dict(hidden=8192, intermediate=22016, layers=80, heads=64),
}
VOCAB = 32000


@dataclass(frozen=True)
class Setting:
    """One training configuration: tokens per step, parameter dtype, activation checkpointing, memory options.

    ``loss_chunk_tokens`` and ``fsdp_units`` default to ``"auto"``, decided for a card of ``device_gib`` GiB
    (``lomo_lightning.device_memory.assumed_device_memory``); ``offloading`` is activation offloading, which
    ``"auto"`` turns on for a GPU with checkpointing (on a CPU it frees nothing: the script's runs turn it on).
    """

    batch: int
    seq: int
    dtype: str = "float16"
    checkpointing: bool = True
    world: int = 1  # ranks of the fake process group; 1: one device, no FSDP
    fsdp_units: str = "auto"  # what one FSDP2 unit gathers: "block", "projection", or "auto" (LomoFSDPStrategy's unit)
    loss_chunk_tokens: int | str | None = "auto"
    offloading: bool = False  # ActivationOffloading around the forward (its tensors counted apart, as host memory)
    device_gib: int = 24  # the card the "auto" options decide for (an RTX 3090, as in the LOMO paper)


# The LOMO paper's memory table (Lv et al., 2023, Table 1): LLaMA-7B, fp16, batch 8 x 512, activation checkpointing.
LOMO_TABLE = Setting(batch=8, seq=512, offloading=True)
# LOMO's 65B claim (8 x RTX 3090): 1024 tokens a step per GPU (OpenLMLab/LOMO#2), fp16 weights without master copies.
LOMO_65B_ON_8 = Setting(batch=1, seq=1024, world=8, offloading=True)
FSDP_UNITS = ["auto", "block", "projection"]
# Rows per memory option: each one turned back off from the defaults (loss chunking auto, offloading on).
OPTIONS: dict[str, dict[str, Any]] = {
    "offloading off": dict(offloading=False),
    "offloading off, full logits": dict(offloading=False, loss_chunk_tokens=None),
}
FSDP_OPTIONS: dict[str, dict[str, Any]] = {"unit block": dict(fsdp_units="block"), "unit projection": dict(fsdp_units="projection"), **OPTIONS}
# Lv et al. (2023), Table 1, checkpointing on; the split follows from the totals and the bytes per parameter it names.
PAPER_7B = {
    "adamw": dict(total=102.20, parameters=12.55, gradients=12.55, optimizer_state=75.31, activations=1.79),
    "sgd": dict(total=51.99, parameters=12.55, gradients=12.55, optimizer_state=25.10, activations=1.79),
    "lomo": dict(total=14.58, parameters=12.55, gradients=0.24, optimizer_state=0.0, activations=1.79),
}
METHODS = list(readme.SCALE_LABELS)
# `lomo-train <overrides>`: gradient clipping off (a fused method's clipping is a second backward pass); SFT at LoRA's
# trainable count (added per model), no reselection within the two steps (it runs after backward anyway)
OVERRIDES = {
    "adamw": ["method=adamw"],
    "sgd": ["method=adamw", "method.optimizer._target_=torch.optim.SGD", "~method.optimizer.betas"],
    "lomo": ["method=lomo"],
    "adalomo": ["method=adalomo"],
    "hft": ["method=adalomo", "selection=hft"],
    "sft": ["selection=sft_sm3", f"selection.selector.reselection_steps={10**9}"],
}
LORA_RANK = 8  # as AdaLomo's instruction tuning (OpenLMLab/LOMO): rank 8, alpha 16, all seven projections
DEPTHS, HFT_DEPTHS, FSDP_DEPTHS = [1, 2, 4], [4, 6, 8], [2, 4, 6]
# AdaLomo's column sums run over row blocks; a fake step pays per operation, so the blocks are 64x the library's here.
# That can raise the peak by at most the larger block, only inside an update; check_adalomo_blocks measures it.
ADALOMO_BLOCK_ELEMENTS = 2**24


# -- the tracker


def peak_by_category(step: Callable[[], None], model: nn.Module, optimizers: list, state: list[Tensor]) -> dict[str, int]:
    """The MemTracker peak of ``step()`` by category (FSDPMemTracker for an FSDP2 model), keeping only the global peak
    (MemTracker's peak per module walks every module on every operation: most of a deep model's time)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(model, FSDPModule)

    class PeakOnly(FSDPMemTracker if sharded else MemTracker):  # type: ignore[misc,valid-type]
        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device], self._peak_mem_snap[device] = snapshot[_TOTAL_KEY], dict(snapshot)

    tracker = PeakOnly(model) if sharded else PeakOnly()
    opt = _FSDPRefType.OPT if sharded else _MemRefType.OPT
    if sharded:
        for optimizer in optimizers:  # FSDPMemTracker's track_external does nothing
            tracker._track_optimizer_states(opt, optimizer)
    else:
        memory.skip_frozen_parameters(tracker, model)
        tracker.track_external(model, *optimizers)
    for tensor in state:
        tracker._update_and_maybe_create_winfos(tensor, opt)
    with tracker, warnings.catch_warnings():
        # the fused engine frees each gradient before MemTracker's own gradient hook looks at it (and warns)
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        step()
    # the device's memory only: offloaded activations wait on the meta device, standing for the host
    snapshot = next(peak for device, peak in tracker.get_tracker_snapshot("peak").items() if device.type != "meta")
    if not sharded:
        return memory.categories(snapshot)
    T = _FSDPRefType
    kinds = {"parameters": [T.SHARDED_PARAM], "gathered_parameters": [T.UNSHARDED_PARAM, T.ALL_GATHER],
             "gradients": [T.SHARDED_GRAD, T.UNSHARDED_GRAD, T.REDUCE_SCATTER], "optimizer_state": [T.OPT],
             "activations": [T.ACT], "temporaries": [T.TEMP], "other": [T.INP, T.BUFFER]}
    return {name: sum(snapshot.get(kind, 0) for kind in of) for name, of in kinds.items()}


# -- the model and the methods


def llama_config(size: str, layers: int) -> Any:
    from transformers import LlamaConfig

    shape = LLAMA1[size]
    return LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=layers,
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"], vocab_size=VOCAB,
                       max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False)


def build_model(config: Any, setting: Setting, lora: bool = False) -> nn.Module:
    """The Llama of ``config`` in ``setting.dtype``, train mode, checkpointing if asked; ``lora``: wrapped by peft, on
    the meta device outside the fake mode (peft moves its adapters with ``Module.to``, which cannot swap fake
    parameters), then given (fake) storage by ``to_empty``."""
    from peft import get_peft_model
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import AutoModelForCausalLM

    with contextlib.ExitStack() as on_meta:
        if lora:
            on_meta.enter_context(unset_fake_temporarily())
            on_meta.enter_context(torch.device("meta"))
        # sdpa: a fused attention kernel on a GPU; the CPU kernel's fake implementation allocates the same outputs
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, setting.dtype), attn_implementation="sdpa")
        if setting.checkpointing:
            model.activation_checkpointing_enable()
        if lora:
            model = get_peft_model(model, methods.lora_config(LORA_RANK))  # the adapters in fp32
    if lora:
        model.to_empty(device="cpu")
    return model.train()


class MasterWeights:
    """Standard mixed precision (DeepSpeed's fp16 optimizers, apex O2, the LOMO paper's count): fp16 weights, an fp32
    master copy that the rule updates one tensor at a time (like DeepSpeed's sub-groups): the fp16 gradient becomes the
    master's fp32 gradient inside the rule's step (counted with the optimizer), then the master is copied back."""

    def __init__(self, params: list[nn.Parameter], factory: Callable[..., Any]):
        self.params, self.master = params, [p.detach().float() for p in params]
        self.optimizer = factory(self.master, foreach=False)
        self.optimizer.register_step_pre_hook(self._take_gradient)
        self._current: tuple[nn.Parameter, Tensor] | None = None

    def _take_gradient(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        param, master = self._current  # type: ignore[misc]
        master.grad, param.grad = param.grad.float(), None

    @torch.no_grad()
    def step(self) -> None:
        for self._current in zip(self.params, self.master):
            self.optimizer.step()  # only this master has a gradient
            param, master = self._current
            master.grad = None
            param.copy_(master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # each gradient was taken by its step


def fake_engine(model: nn.Module, rule: Any, group: Any = None, **options: Any) -> Any:
    """The fused engine (``ShardedFusedUpdater`` over ``group``, else ``FusedUpdater``) on fake tensors, which have no
    values: no finite-loss check and no fp16 loss scaler (its overflow check reads a norm; its first backward frees
    every gradient at once, adding no peak), the stochastic write-back's bits keyed on zeros (a fake tensor and a fake
    process group lack a step count and shard offset; the same bits in the same memory)."""
    from lomo_lightning import FusedUpdater
    from lomo_lightning.optim.base import write_back_of
    from lomo_lightning.optim.rounding import WriteBack
    from lomo_lightning.strategies.fsdp import ShardedFusedUpdater

    rule.write_back = lambda param, group_, state: (
        WriteBack("stochastic", key=(group_["seed"], 0, 0)).write(param.device)
        if group_["rounding"] == "stochastic" else write_back_of(param, group_, state, step=0, position=0))
    with mock.patch("lomo_lightning.optim.base.flat_offset", lambda param: 0):  # the facts learned when it attaches
        engine = ShardedFusedUpdater(model, rule, group=group, **options) if group is not None else FusedUpdater(model, rule, **options)
    engine.loss_scaler = None
    engine.loss_is_finite = lambda loss: True
    return engine


def _apply_selection_for_real(apply: Callable[..., Any]) -> Callable[..., Any]:
    """The app's ``apply_selection``, outside the fake mode: SFT draws its initial entries with real random numbers;
    its indices and values are then made fake like the rest of the model (a real tensor meeting fake ones is
    converted on every use, and the tracker counts each conversion)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    def apply_selection(node: Any, model: nn.Module, optimizer: Any) -> Any:
        with unset_fake_temporarily():
            selector = apply(node, model, optimizer)
        for layer in getattr(selector, "layers", {}).values() if isinstance(next(model.parameters()), FakeTensor) else ():
            layer.indices = layer.indices.clone()
            layer.values = nn.Parameter(layer.values.detach().clone())
        return selector

    return apply_selection


def training_loss(model: nn.Module, batch: dict[str, Tensor], setting: Setting) -> Tensor:
    """The loss as ``CausalLMModule`` computes it (``setting``'s ``loss_chunk_tokens``), under activation offloading if
    ``setting.offloading`` (its host is the meta device, so the tracker counts those tensors apart)."""
    from lomo_lightning import chunked_causal_lm_loss
    from lomo_lightning.activations import ActivationOffloading
    from lomo_lightning.objectives.causal_lm import auto_chunk_tokens

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's LoRA: the Llama inside
    chunk_tokens = setting.loss_chunk_tokens
    if chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(causal_lm, batch["input_ids"])
    with ActivationOffloading(host="meta") if setting.offloading else contextlib.nullcontext():
        if chunk_tokens is None:
            return model(**batch).loss
        return chunked_causal_lm_loss(causal_lm, chunk_tokens=int(chunk_tokens), **batch)


def prepare(method: str, model: nn.Module, setting: Setting, group: Any = None) -> methods.Method:
    """``method`` on ``model``; ``group``: the shard group when the model is sharded by FSDP2."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from lomo_lightning import train
    from lomo_lightning.preflight import checked_method

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return training_loss(model, batch, setting)

    if method == "floor":
        return methods.floor(model, loss)
    if method == "lora":  # the adapters are in the model already (build_model)
        return methods.standard(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False), loss)
    overrides = [*OVERRIDES[method], "method.gradient_clip_val=null"]
    if method in ("adamw", "sgd"):
        master = MasterWeights(list(model.parameters()), checked_method(methods.compose(*overrides).method, 1)[0])
        built = methods.standard(model, master, loss)
        return replace(built, optimizers=[master.optimizer], state=lambda: master.master)
    if method == "sft":
        with unset_fake_temporarily():  # peft's modules are built for real (on the meta device)
            overrides.append(f"selection.selector.num_tunable_weights={methods.lora_parameter_count(model.config, LORA_RANK)}")
    with mock.patch.object(train, "apply_selection", _apply_selection_for_real(train.apply_selection)):
        return methods.build(model, overrides, total_steps=10**9, loss=loss,
                             engine=lambda model, rule, **options: fake_engine(model, rule, group, **options))


# -- one measurement


def measure(config: Any, method: str, setting: Setting, *, fake: bool = True,
            adalomo_blocks: int | None = ADALOMO_BLOCK_ELEMENTS) -> dict[str, Any]:
    """Peak memory of one training step of ``method`` on a Llama of ``config``, after an untracked warm-up step
    (optimizer state then exists). ``fake=False``: the same on real tensors (the test's check of the fake figure)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp import FSDPModule

    from lomo_lightning.device_memory import assumed_device_memory
    from lomo_lightning.optim import adalomo
    from lomo_lightning.strategies.fsdp import shard_transformers

    if setting.offloading and not fake:
        raise ValueError("memory_scale: offloading is estimated on fake tensors only (its host is the meta device)")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(fake_mesh(setting.world)) if setting.world > 1 else None
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext())
        stack.enter_context(mock.patch.object(adalomo, "_BLOCK_ELEMENTS", adalomo_blocks or adalomo._BLOCK_ELEMENTS))
        stack.enter_context(assumed_device_memory(setting.device_gib * GIB))
        # eager rules: MemTracker cannot see into compiled kernels (and compiling's probe must not run on fake tensors)
        stack.enter_context(mock.patch.dict(os.environ, {"LOMO_LIGHTNING_COMPILE": "0"}))
        torch.manual_seed(0)
        model = build_model(config, setting, lora=method == "lora")
        unit = {}
        if mesh is not None:
            shard_transformers(model, mesh, unit=setting.fsdp_units)  # each unit (chosen for the card), then the model
            units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
            unit = {"fsdp_unit": "projection" if any(isinstance(m, nn.Linear) for m in units) else "block"}
        training = prepare(method, model, setting, group=mesh.get_group() if mesh is not None else None)
        batch = padded_batch(config.vocab_size, setting)
        training.step(batch)
        peak = peak_by_category(lambda: training.step(batch), training.model, training.optimizers, training.state())
    return {"method": method, "layers": config.num_hidden_layers, "trainable": training.trainable,
            "peak_bytes": sum(peak.values()), "peak_by_category_bytes": peak, "wall_s": round(time.perf_counter() - start, 1), **unit}


def padded_batch(vocab_size: int, setting: Setting) -> dict[str, Tensor]:
    """Random tokens, one sequence left-padded by one token: Hugging Face then builds an explicit causal mask for SDPA,
    as for every padded fine-tuning batch, and as for fake inputs (whose padding it cannot read)."""
    input_ids = torch.randint(0, vocab_size, (setting.batch, setting.seq))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.masked_fill(attention_mask == 0, -100)}


@contextlib.contextmanager
def fake_mesh(world: int) -> Any:
    """A 1-D device mesh over a fake process group of ``world`` ranks (this process is rank 0): collectives return at
    once and move nothing; FSDP2 and the engine run rank 0's code, allocating what rank 0 would."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("memory_scale: a process group exists already; the fake one needs a process of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))  # outside FakeTensorMode: the mesh reads its real rank tensor
    finally:
        dist.destroy_process_group()


# -- measurements made ahead in worker processes (--jobs), kept in a cache (--cache)


class MeasurementError(Exception):
    """A measurement made ahead failed; the message is its error's."""


MEASURED: dict[tuple, dict[str, Any]] = {}
PLANNED: list[tuple] | None = None  # while planning: the measurements the report asks for
CACHED_ONLY = False  # --cached-only: what the cache lacks is not measured


def measure_llama(size: str, method: str, layers: int, setting: Setting, adalomo_blocks: int | None = ADALOMO_BLOCK_ELEMENTS) -> dict[str, Any]:
    """:func:`measure` on LLaMA-``size`` cut to ``layers`` blocks (or its result made ahead)."""
    key = (size, method, layers, setting, adalomo_blocks)
    if PLANNED is not None:  # planning: a stand-in of the right shape
        PLANNED.append(key)
        return {"method": method, "layers": layers, "trainable": 0, "peak_bytes": 1, "wall_s": 0.0, "size": size,
                "peak_by_category_bytes": dict.fromkeys([*readme.SCALE_CATEGORIES, "other"], 0)}
    if key not in MEASURED and CACHED_ONLY:
        raise MeasurementError("not measured (not in the cache)")
    result = MEASURED.get(key) or dict(measure(llama_config(size, layers), method, setting, adalomo_blocks=adalomo_blocks), size=size)
    if "error" in result:
        raise MeasurementError(result["error"])
    return result


def _measure_key(key: tuple) -> tuple[tuple, dict[str, Any]]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    try:
        return key, measure_llama(*key)
    except Exception as error:  # a method that cannot run is a result, with its reason
        return key, {"error": f"{type(error).__name__}: {error}"}


def measure_ahead(build: Callable[[], Any], workers: int, log: Callable[[str], None], cache: Path | None) -> None:
    """Every measurement ``build()`` asks for (it runs once on stand-ins to plan), in ``workers`` processes, the
    deepest first; ``cache``: a JSON-lines file of earlier results, reused, and appended to as results come."""
    global PLANNED
    PLANNED = []
    try:
        build()
        keys = list(dict.fromkeys(PLANNED))
    finally:
        PLANNED = None

    def text(key: tuple) -> str:
        return json.dumps([key[0], key[1], key[2], asdict(key[3]), key[4]])

    earlier = {}
    if cache is not None and cache.is_file():
        earlier = {entry["key"]: entry["result"] for entry in map(json.loads, cache.read_text().splitlines())}
    MEASURED.update({key: earlier[text(key)] for key in keys if text(key) in earlier})
    keys = [key for key in keys if key not in MEASURED]
    if CACHED_ONLY or not keys:
        return
    keys.sort(key=lambda k: -k[2] * (3 if k[3].world > 1 else 1))  # the longest first, so they do not finish last
    log(f"{len(keys)} measurements in {workers} processes ({len(MEASURED)} from the cache)")
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for key, result in pool.imap_unordered(_measure_key, keys):
            MEASURED[key] = result
            if cache is not None:
                with cache.open("a") as file:
                    file.write(json.dumps({"key": text(key), "result": result}) + "\n")
            log(f"  {key[0]} {key[1]} at {key[2]} blocks ({key[3]}): "
                + (result.get("error") or f"{result['peak_bytes'] / GIB:.3f} GiB in {result['wall_s']:.0f} s"))


# -- depth: measure a few, extrapolate to all


def parameter_count(size: str, layers: int) -> int:
    h, i = LLAMA1[size]["hidden"], LLAMA1[size]["intermediate"]
    return 2 * VOCAB * h + h + layers * (4 * h * h + 3 * h * i + 2 * h)


def extrapolate(rows: list[dict[str, Any]], layers: int) -> dict[str, Any]:
    """The peak at ``layers`` blocks on the line through the two deepest measurements (total and each category);
    ``max_residual_bytes``: the largest distance of a measured depth from it (a shallow model may peak elsewhere)."""
    ordered = sorted(rows, key=lambda r: r["layers"])
    shallow, deep = ordered[-2], ordered[-1]

    def at(value: Callable[[dict[str, Any]], float], depth: int) -> float:
        return value(deep) + (value(deep) - value(shallow)) / (deep["layers"] - shallow["layers"]) * (depth - deep["layers"])

    def total(r: dict[str, Any]) -> float:
        return r["peak_bytes"]

    return {"layers": layers, "peak_bytes": at(total, layers),
            "peak_by_category_bytes": {c: at(lambda r, c=c: r["peak_by_category_bytes"][c], layers) for c in deep["peak_by_category_bytes"]},
            "bytes_per_block": at(total, deep["layers"] + 1) - deep["peak_bytes"],
            "max_residual_bytes": max(abs(at(total, r["layers"]) - r["peak_bytes"]) for r in ordered),
            "measured_depths": [r["layers"] for r in ordered]}


def sweep(sizes: list[str], depths: dict[str, list[int]], setting: Setting, log: Callable[[str], None], **extra: Any) -> list[dict[str, Any]]:
    """Every size x method (the keys of ``depths``): measured at its depths, extrapolated to the real depth."""
    estimates = []
    for size in sizes:
        for method, method_depths in depths.items():
            try:
                measured = [measure_llama(size, method, layers, setting) for layers in sorted(method_depths)]
            except Exception as error:  # a method that cannot run is a result, with its reason
                log(f"  {size} {method} failed: {type(error).__name__}: {error}")
                estimates.append({"size": size, "method": method, "error": f"{type(error).__name__}: {error}", **extra})
                continue
            estimate = extrapolate(measured, LLAMA1[size]["layers"])
            estimate.update(size=size, method=method, parameters=parameter_count(size, LLAMA1[size]["layers"]),
                            trainable_at_measured_depths=[r["trainable"] for r in measured], measured=measured, **extra)
            estimates.append(estimate)
            log(f"  {size} {method}: {estimate['peak_bytes'] / GIB:.2f} GiB ({estimate['bytes_per_block'] / GIB:.3f} GiB a block, "
                f"residual {estimate['max_residual_bytes'] / 2**20:.1f} MiB)")
    return estimates


def check_full_depth(pairs: list[tuple[str, str]], estimates: list[dict[str, Any]], setting: Setting, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``(size, method)`` at its real depth and compare with the extrapolated estimate."""
    checks = []
    for size, method in pairs:
        full = measure_llama(size, method, LLAMA1[size]["layers"], setting)
        check: dict[str, Any] = {"size": size, "method": method, "full_depth": full}
        estimate = next((e for e in estimates if e["size"] == size and e["method"] == method and "error" not in e), None)
        if estimate is not None:
            check.update(extrapolated_bytes=estimate["peak_bytes"], relative_error=estimate["peak_bytes"] / full["peak_bytes"] - 1)
        checks.append(check)
        log(f"  {size} {method}, all {full['layers']} blocks: {full['peak_bytes'] / GIB:.3f} GiB")
    return checks


def check_adalomo_blocks(size: str, setting: Setting) -> dict[str, Any]:
    """AdaLomo at one block with the library's own row blocks against the enlarged ones used everywhere else."""
    enlarged, exact = measure_llama(size, "adalomo", 1, setting), measure_llama(size, "adalomo", 1, setting, adalomo_blocks=None)
    return {"size": size, "exact": exact, "enlarged": enlarged, "difference_bytes": enlarged["peak_bytes"] - exact["peak_bytes"]}


# -- the report


def build_report(args: argparse.Namespace, setting: Setting, log: Callable[[str], None]) -> dict[str, Any]:
    """Every estimate, option row and check the arguments ask for."""
    log(f"one device: {setting}")
    depths = {m: args.depths or (HFT_DEPTHS if m == "hft" else DEPTHS) for m in args.methods}
    estimates = sweep(args.sizes, depths, setting, log)
    checks = check_full_depth(args.full_depth, estimates, setting, log)
    block_check = None
    if "7b" in args.sizes and any(e["method"] in ("adalomo", "hft", "sft") for e in estimates):
        block_check = check_adalomo_blocks("7b", setting)
    options = []
    for option, changes in OPTIONS.items():
        option_depths = {m: depths.get(m) or args.depths or (HFT_DEPTHS if m == "hft" else DEPTHS) for m in args.option_methods}
        options += sweep(args.option_sizes, option_depths, replace(setting, **changes), log, option=option, world=1)
    fsdp = None
    if args.fsdp_sizes:
        world = replace(LOMO_65B_ON_8, dtype=args.dtype, world=args.world)
        fsdp = {"setting": asdict(world), "depths": sorted(args.fsdp_depths), "estimates": []}
        for units in args.fsdp_units:
            log(f"FSDP2: {replace(world, fsdp_units=units)}")
            fsdp["estimates"] += sweep(args.fsdp_sizes, dict.fromkeys(args.fsdp_methods, args.fsdp_depths), replace(world, fsdp_units=units),
                                       log, fsdp_units=units)
        if args.fsdp_full_depth:
            first = replace(world, fsdp_units=args.fsdp_units[0])
            of_units = [e for e in fsdp["estimates"] if e["fsdp_units"] == first.fsdp_units]
            checks += [dict(c, world=first.world, fsdp_units=first.fsdp_units)
                       for c in check_full_depth([(size, "lomo") for size in args.fsdp_sizes], of_units, first, log)]
        for option in args.fsdp_options:
            options += sweep(args.fsdp_sizes, dict.fromkeys(args.fsdp_option_methods, args.fsdp_depths),
                             replace(world, **FSDP_OPTIONS[option]), log, option=option, world=world.world, fsdp_units=world.fsdp_units)
    import transformers

    return {
        "command_suffix": " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "",
        "setting": asdict(setting), "sizes": args.sizes, "methods": args.methods, "depths": depths,
        "estimates": estimates, "full_depth_checks": checks, "adalomo_block_check": block_check, "fsdp": fsdp, "options": options,
        "paper_7b_gib": PAPER_7B,
        "notes": {
            "units": "bytes in the JSON; GiB (2**30 bytes) in the tables; the LOMO paper's 'GB' are GiB",
            "extrapolation": "a line through the two deepest measured depths, evaluated at the real depth; "
            "max_residual_bytes is the largest distance of a measured depth from it",
            "adalomo_blocks": f"AdaLomo's column sums run over row blocks of {ADALOMO_BLOCK_ELEMENTS:,} elements instead of the library's "
            "2**18, which only makes the fake-tensor step faster (see adalomo_block_check)",
            "methods": "as lomo-train builds them (harness.methods.build: conf/method, conf/selection) with gradient clipping off; "
            "AdamW and SGD: conf/method/adamw.yaml's rule (SGD: its _target_ swapped) on fp32 master weights",
            "lora": f"peft LoRA r={LORA_RANK}, alpha {2 * LORA_RANK} on {', '.join(methods.LORA_TARGETS)}; AdamW on the (fp32) adapters",
            "sft": "selection=sft_sm3 (SpIEL-MA, the SM3 rule fused on its values) at LoRA's trainable count; an ordinary step "
            "(the reselection runs after backward, when no gradient exists); its sampled weight gradient is the custom operator "
            "lomo_lightning::sampled_gradient, counted by its result (k floats)",
            "defaults": "loss_chunk_tokens and the FSDP2 unit 'auto', decided for a card of device_gib GiB; activation "
            "offloading on (what 'auto' does on a GPU with checkpointing), its tensors held on the meta device, standing "
            "for the host, and left out of the figures",
        },
        "environment": env.environment(transformers=transformers.__version__),
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["setting"]
    chunks = {"auto": "loss chunking auto", None: "full logits"}.get(s["loss_chunk_tokens"], f"loss in chunks of {s['loss_chunk_tokens']} tokens")
    head = (f"# Peak training memory of LLaMA-7B to 65B, estimated with fake tensors\n\n`python benchmarks/memory_scale.py"
            f"{report['command_suffix']}`: MemTracker peak of one training step (after a warm-up step) under `FakeTensorMode`, "
            f"LLaMA-1 shapes, vocabulary {VOCAB}; {s['dtype']} parameters, batch {s['batch']} x {s['seq']} tokens on one device, "
            f"activation checkpointing {'on' if s['checkpointing'] else 'off'}, {chunks}, activation offloading "
            f"{'on' if s['offloading'] else 'off'} (auto options for a {s['device_gib']} GiB card). Each figure is extrapolated "
            "from a few depths (the line through the two deepest); GiB.\n\n")
    parts = [("## LLaMA-7B against the LOMO paper (Lv et al., 2023, Table 1)", readme.scale_7b(report)),
             ("## Every size", readme.scale_sizes(report)),
             ("## Per rank under `lomo_fsdp` (FSDP2, fake process group)", readme.scale_fsdp(report)),
             ("## Each memory option turned off (the rows above have the defaults)", readme.scale_options(report)),
             ("## Checks", readme.scale_checks(report))]
    return head + "\n".join(f"{title}\n\n{body}" for title, body in parts if body)


def plot(report: dict[str, Any], results_name: str) -> None:
    fsdp = report.get("fsdp")
    fig, axes = env.figure(1, 2 if fsdp else 1, figsize=(14 if fsdp else 8, 5.5), squeeze=False)
    ax, sizes = axes[0][0], report["sizes"]
    billions = [parameter_count(s, LLAMA1[s]["layers"]) / 1e9 for s in sizes]
    for method in report["methods"]:
        points = [(b, gib(e["peak_bytes"])) for s, b in zip(sizes, billions)
                  for e in report["estimates"] if e["size"] == s and e["method"] == method and "error" not in e]
        if points:
            ax.plot(*zip(*points), marker="o", label=readme.SCALE_LABELS[method])
    if "7b" in sizes:
        for method, paper in PAPER_7B.items():
            ax.scatter([billions[sizes.index("7b")]], [paper["total"]], marker="x", color="black", zorder=5)
            ax.annotate(f"paper {method} {paper['total']:.1f}", (billions[sizes.index("7b")], paper["total"]),
                        textcoords="offset points", xytext=(6, -4), fontsize=7)
    ax.axhline(24, color="grey", linestyle="--", linewidth=1, label="24 GiB (one RTX 3090)")
    ax.set(xscale="log", yscale="log", xlabel="LLaMA-1 model", ylabel="estimated peak (GiB, one device)")
    ax.minorticks_off()
    ax.set_xticks(billions, [s.upper() for s in sizes])
    s = report["setting"]
    ax.set_title(f"One device: {s['dtype']}, batch {s['batch']} x {s['seq']}" + (", activation checkpointing" if s["checkpointing"] else ""), fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    if fsdp:
        ax, rows = axes[0][1], [e for e in fsdp["estimates"] if "error" not in e]
        labels = [f"{e['size'].upper()} {readme.SCALE_LABELS[e['method']].split(',')[0]},\nFSDP2 unit: {e['fsdp_units']}" for e in rows]
        left = [0.0] * len(rows)
        for name in readme.SCALE_CATEGORIES:
            values = [max(gib(e["peak_by_category_bytes"].get(name, 0.0)), 0.0) for e in rows]
            ax.barh(labels, values, left=left, label=name.replace("_", " "))
            left = [a + b for a, b in zip(left, values)]
        ax.axvline(24, color="black", linestyle="--", linewidth=1, label="24 GiB (RTX 3090)")
        ax.invert_yaxis()
        w = fsdp["setting"]
        ax.set(xlabel="estimated peak per rank (GiB)")
        ax.set_title(f"Per rank, lomo_fsdp on {w['world']} ranks: {w['dtype']}, batch {w['batch']} x {w['seq']} a rank", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    env.save(fig, results_name)


def size_method(value: str) -> tuple[str, str]:
    size, _, method = value.partition(":")
    if size not in LLAMA1 or method not in METHODS:
        raise argparse.ArgumentTypeError(f"SIZE:METHOD with SIZE in {sorted(LLAMA1)} and METHOD in {METHODS}, got {value!r}")
    return size, method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(LLAMA1), default=list(LLAMA1))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--depths", nargs="+", type=int, help=f"blocks measured per size and method (default {DEPTHS}, HFT {HFT_DEPTHS})")
    p.add_argument("--batch", type=int, default=LOMO_TABLE.batch)
    p.add_argument("--seq", type=int, default=LOMO_TABLE.seq)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=LOMO_TABLE.dtype)
    p.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
    p.add_argument("--full-depth", nargs="*", type=size_method, default=[("7b", "adalomo")], metavar="SIZE:METHOD",
                   help="also run these at their real depth and compare with the extrapolation")
    p.add_argument("--fsdp-sizes", nargs="*", choices=list(LLAMA1), default=["65b"], help="per-rank estimates under FSDP2")
    p.add_argument("--fsdp-methods", nargs="+", choices=["lomo", "adalomo", "adamw"], default=["lomo", "adalomo", "adamw"])
    p.add_argument("--fsdp-depths", nargs="+", type=int, default=FSDP_DEPTHS)
    p.add_argument("--fsdp-units", nargs="+", choices=FSDP_UNITS, default=["auto", "block"], help="what an FSDP2 unit gathers")
    p.add_argument("--fsdp-full-depth", action="store_true", help="also run FSDP2 LOMO (the first --fsdp-units) at its real depth")
    p.add_argument("--option-sizes", nargs="*", choices=list(LLAMA1), default=["7b", "65b"], help=f"sizes of the rows with {list(OPTIONS)}")
    p.add_argument("--option-methods", nargs="+", choices=METHODS, default=["lomo", "adalomo"])
    p.add_argument("--fsdp-option-methods", nargs="*", choices=["lomo", "adalomo", "adamw"], default=["lomo"])
    p.add_argument("--fsdp-options", nargs="*", choices=list(FSDP_OPTIONS), default=list(FSDP_OPTIONS))
    p.add_argument("--jobs", type=int, default=1, help="measure in this many processes (each a core and a few GiB)")
    p.add_argument("--cache", type=Path, help="a JSON-lines file of results kept across runs (of the same code)")
    p.add_argument("--cached-only", action="store_true", help="with --cache: render what it holds, measure nothing")
    p.add_argument("--world", type=int, default=LOMO_65B_ON_8.world)
    p.add_argument("--tag", help="write memory_scale_<tag>.* (required when the setting differs from the LOMO table's)")
    args = p.parse_args()
    if len(set(args.depths or DEPTHS)) < 2 or len(set(args.fsdp_depths)) < 2:
        raise SystemExit("memory_scale: a line needs at least two different --depths / --fsdp-depths")
    setting = replace(LOMO_TABLE, batch=args.batch, seq=args.seq, dtype=args.dtype, checkpointing=not args.no_checkpointing)
    if setting != LOMO_TABLE and not args.tag:
        raise SystemExit("memory_scale: a setting other than the LOMO table's needs --tag NAME (its results go to memory_scale_NAME.*)")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    if args.jobs > 1 or args.cache:
        measure_ahead(lambda: build_report(args, setting, lambda message: None), args.jobs, log, args.cache)
    report = dict(build_report(args, setting, log), wall_s=round(time.perf_counter() - started))
    name = "memory_scale" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    plot(report, name)
    print(markdown(report))


if __name__ == "__main__":
    main()
