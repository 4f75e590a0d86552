"""Peak training memory of LLaMA-7B to 65B on a CPU, without allocating it: fake tensors + MemTracker.

    python benchmarks/memory_scale.py                  # every size x method, checks, 65B per rank on 8 ranks
    python benchmarks/memory_scale.py --sizes 7b --methods lomo adamw --full-depth 7b:lomo --fsdp-sizes
    python benchmarks/memory_scale.py --batch 1 --seq 2048 --tag seq2048    # another setting

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` every tensor has a shape, a dtype and a storage size
but no data, so a training step of a 65B model runs in a few GiB of host memory. The
``torch.distributed._tools.mem_tracker.MemTracker`` dispatch mode sees every allocation and free and keeps the
peak of the live bytes, split by category (parameters, gradients, optimizer state, activations, temporaries).
The model is Hugging Face's ``LlamaForCausalLM`` with LLaMA-1 shapes; the step is this package's own code
(``FusedUpdater``, ``ShardedFusedUpdater``, ``HalfFineTuning``, ``SparseFineTuning``) or the standard one.
On a tiny model the fake figure equals the real-tensor one byte for byte (``tests/test_memory_scale.py``).

Depth: the blocks of a transformer are identical, so past a few blocks the peak grows by the same bytes per
block, as long as it happens at the same point of the step. Every size and method is measured at a few depths
(1, 2 and 4 blocks; HFT, whose frozen matrices differ from block to block, 4, 6 and 8; under FSDP2 2, 4 and 6)
and the line through the two deepest is evaluated at the real depth. The distance of the shallowest depth from
that line is reported: where it is not zero, the peak of a shallow model falls elsewhere in the step. Full-depth
runs (``--full-depth``, ``--fsdp-full-depth``) check the extrapolation itself. A deep model's step is slow
mostly because MemTracker also keeps a peak per module, walking all modules on every operation; only the
global peak is kept here.

What a MemTracker figure is, and is not: the bytes of the live tensors at the worst instant of one step (after
a warm-up step, so optimizer state exists). It leaves out what a GPU adds on top: the CUDA context, the
caching allocator's rounding and fragmentation, cuBLAS / attention workspaces and communication buffers.

Per rank: FSDP2 (``fully_shard`` per unit, then the model, as ``strategy="lomo_fsdp"`` does) over a fake
process group (``FakeStore``, backend ``"fake"``, 8 ranks) in this one process, with ``ShardedFusedUpdater``;
the figure is what rank 0 holds (FSDPMemTracker tells sharded from gathered parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from harness import env, memory, methods
from harness.env import (
    RESULTS,
    gib,
)
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

    The memory options are the library's: ``loss_chunk_tokens`` and ``fsdp_units`` default to ``"auto"``, decided
    for a card of ``device_gib`` GiB (:func:`lomo_lightning.device_memory.assumed_device_memory`);
    ``offloading`` is activation offloading, which ``"auto"`` turns on for a GPU with checkpointing (on a CPU it
    frees nothing, so the default here is off and the script's runs turn it on, as a GPU would).
    """

    batch: int
    seq: int
    dtype: str = "float16"
    checkpointing: bool = True
    world: int = 1  # ranks of the fake process group; 1: one device, no FSDP
    fsdp_units: str = "auto"  # what one FSDP2 unit gathers: "block", "projection", or "auto" (LomoFSDPStrategy's unit)
    loss_chunk_tokens: int | str | None = "auto"  # the modules' loss_chunk_tokens
    offloading: bool = False  # ActivationOffloading around the forward (the saved tensors counted apart, as host memory)
    device_gib: int = 24  # the card the "auto" options decide for (an RTX 3090, as in the LOMO paper)

    def describe(self) -> str:
        where = f"per rank of {self.world} (FSDP2, unit {self.fsdp_units})" if self.world > 1 else "on one device"
        chunks = {"auto": "loss chunking auto", None: "full logits"}.get(self.loss_chunk_tokens, f"loss in chunks of {self.loss_chunk_tokens} tokens")  # type: ignore[arg-type]
        return (
            f"{self.dtype} parameters, batch {self.batch} x {self.seq} tokens {where}, "
            f"activation checkpointing {'on' if self.checkpointing else 'off'}, {chunks}, "
            f"activation offloading {'on' if self.offloading else 'off'} (auto options for a {self.device_gib} GiB card)"
        )


# The LOMO paper's memory table (Lv et al., 2023, Table 1): LLaMA-7B, fp16, batch 8 x 512, with and without
# activation checkpointing (the "with" rows are compared). Its "GB" are GiB: 12.55 = 6.74e9 parameters x 2 bytes.
LOMO_TABLE = Setting(batch=8, seq=512, offloading=True)
# LOMO's 65B claim (8 x RTX 3090, 24 GiB each): its throughput runs used 1024 tokens a step per GPU
# (OpenLMLab/LOMO#2) and fp16 weights without fp32 master copies.
LOMO_65B_ON_8 = Setting(batch=1, seq=1024, world=8, offloading=True)
GPU_24GB = 24 * GIB
# FSDP2 units (LomoFSDPStrategy's unit): "auto" (the default) takes the largest that fits 8% of the card; "block"
# shards every transformer block; "projection" every weight matrix, closer to DeepSpeed ZeRO-3 in LOMO's runs,
# which gathers at most 1e8 parameters at a time (stage3_max_live_parameters in OpenLMLab/LOMO's ds_config.json).
FSDP_UNITS = ["auto", "block", "projection"]
# Rows per memory option: each one turned back off from the defaults (loss chunking auto, offloading on).
OPTIONS: dict[str, dict[str, Any]] = {
    "offloading off": dict(offloading=False),
    "offloading off, full logits": dict(offloading=False, loss_chunk_tokens=None),
}
FSDP_OPTIONS: dict[str, dict[str, Any]] = {"unit block": dict(fsdp_units="block"), "unit projection": dict(fsdp_units="projection"), **OPTIONS}

# Lv et al. (2023), Table 1, activation checkpointing on. The totals are the paper's; the split follows from
# them and from the bytes per parameter it names (fp16 weights and gradients; AdamW: fp32 master weights and
# two fp32 moments, 12 bytes; SGD: the fp32 master weights, 4 bytes; LOMO: the largest gradient, the 32000 x 4096
# embedding in fp16): the activations are 1.79 GiB in all three rows.
PAPER_7B = {
    "adamw": dict(total=102.20, parameters=12.55, gradients=12.55, optimizer_state=75.31, activations=1.79),
    "sgd": dict(total=51.99, parameters=12.55, gradients=12.55, optimizer_state=25.10, activations=1.79),
    "lomo": dict(total=14.58, parameters=12.55, gradients=0.24, optimizer_state=0.0, activations=1.79),
}

# SFT's backward samples the weight gradient through a sparse CSR tensor (torch.sparse.sampled_addmm), which fake
# tensors do not support; the library runs it as a custom operator with a fake implementation (its result, k floats)
METHODS = ["floor", "adamw", "sgd", "lomo", "adalomo", "hft", "sft", "lora"]
LABELS = {
    "floor": "floor (backward, gradients dropped, no update)",
    "adamw": "AdamW, fp32 master weights (standard)",
    "sgd": "SGD, fp32 master weights (standard)",
    "lomo": "LOMO (fused)",
    "adalomo": "AdaLomo (fused)",
    "hft": "HFT + AdaLomo (fused)",
    "sft": "SFT-MA + SM3 (fused), LoRA's budget",
    "lora": "LoRA r=8 (peft) + AdamW",
}
CATEGORIES = ["parameters", "gradients", "optimizer_state", "activations", "temporaries", "other"]

# LoRA as in AdaLomo's instruction tuning (OpenLMLab/LOMO, adalomo/instruction-tuning/train.py): rank 8, alpha 16
# on all seven projections of every block; AdamW on the adapters (peft keeps them in fp32).
LORA_RANK = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Blocks measured per size and method. HFT's trainable matrices differ from block to block at random, so the
# block whose backward holds the peak, and what it holds there, keep changing over the first blocks: its line
# starts deeper (on 65B: -1.9% from 2 and 4 blocks, +0.0% from 6 and 8, against all 80).
DEPTHS = [1, 2, 4]
HFT_DEPTHS = [4, 6, 8]
FSDP_DEPTHS = [2, 4, 6]

# AdaLomo sums the squares of each matrix's columns a block of rows at a time (1 MiB of fp32 a block, fast on a
# CPU); a fake-tensor step pays per operation, so the blocks are 64x larger here. That can raise the peak by at
# most the larger block (63 MiB more), and only if the peak falls inside an AdaLomo update; each run checks it
# on LLaMA-7B at one block (check_adalomo_blocks).
ADALOMO_BLOCK_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------------------
# the tracker


def _peak_only(tracker_class: type) -> type:
    """``tracker_class`` (MemTracker or FSDPMemTracker) keeping only the global peak.

    MemTracker also records a peak per module, walking every module it has seen on every operation:
    O(modules x operations), most of the time of a deep model's step. The global peak is computed as there.
    """
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class PeakMemoryTracker(tracker_class):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

    return PeakMemoryTracker


def peak_by_category(step: Callable[[], None], model: nn.Module, optimizers: list, state: list[Tensor]) -> dict[str, int]:
    """The MemTracker peak of ``step()``, in bytes by category (``step`` runs once, inside the tracker).

    ``state``: optimizer state held outside ``optimizer.state`` (master weights, SFT's routes). An FSDP2 model
    is tracked by FSDPMemTracker, which also tells sharded from gathered parameters and gradients.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        tracker = _peak_only(FSDPMemTracker)(model)
        categories = {
            "parameters": [_FSDPRefType.SHARDED_PARAM],
            "gathered_parameters": [_FSDPRefType.UNSHARDED_PARAM, _FSDPRefType.ALL_GATHER],
            "gradients": [_FSDPRefType.SHARDED_GRAD, _FSDPRefType.UNSHARDED_GRAD, _FSDPRefType.REDUCE_SCATTER],
            "optimizer_state": [_FSDPRefType.OPT],
            "activations": [_FSDPRefType.ACT],
            "temporaries": [_FSDPRefType.TEMP],
            "other": [_FSDPRefType.INP, _FSDPRefType.BUFFER],
        }
        opt_type = _FSDPRefType.OPT
        for optimizer in optimizers:  # FSDPMemTracker's track_external does nothing
            tracker._track_optimizer_states(opt_type, optimizer)
    else:
        tracker = _peak_only(MemTracker)()
        memory.skip_frozen_parameters(tracker, model)
        tracker.track_external(model, *optimizers)
        categories = {}  # harness.memory.categories
        opt_type = _MemRefType.OPT
    for tensor in state:
        tracker._update_and_maybe_create_winfos(tensor, opt_type)
    with tracker, warnings.catch_warnings():
        # the fused engine frees each gradient before MemTracker's own gradient hook looks at it (and warns)
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        step()
    peaks = tracker.get_tracker_snapshot("peak")
    # the device's memory only: offloaded activations wait on the meta device, standing for the host
    snapshot = next(peak for device, peak in peaks.items() if device.type != "meta")
    if not categories:
        return memory.categories(snapshot)
    return {name: sum(snapshot.get(kind, 0) for kind in kinds) for name, kinds in categories.items()}


# ---------------------------------------------------------------------------------------------------------
# the model and the methods


def llama_config(size: str, layers: int):
    from transformers import LlamaConfig

    shape = LLAMA1[size]
    return LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
    )


def build_model(config, setting: Setting, lora: bool = False) -> nn.Module:
    """The Llama of ``config`` in ``setting.dtype``, in train mode, with activation checkpointing if asked.

    ``lora``: wrapped by peft (rank ``LORA_RANK`` on ``LORA_TARGETS``). peft moves new adapters with ``Module.to``,
    which cannot swap fake parameters; so that model is built on the meta device, outside any fake mode, and
    then given storage with ``to_empty`` (fake storage under ``FakeTensorMode``).
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import AutoModelForCausalLM

    with contextlib.ExitStack() as on_meta:
        if lora:
            on_meta.enter_context(unset_fake_temporarily())
            on_meta.enter_context(torch.device("meta"))
        # sdpa: on a GPU a fused attention kernel (no batch x heads x seq x seq matrix); the CPU kernel's fake
        # implementation allocates the same outputs
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, setting.dtype), attn_implementation="sdpa")
        if setting.checkpointing:
            model.activation_checkpointing_enable()
        if lora:
            from peft import LoraConfig, get_peft_model

            adapters = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS)
            model = get_peft_model(model, adapters)  # the adapters in fp32 (peft's autocast_adapter_dtype)
    if lora:
        model.to_empty(device="cpu")
    return model.train()


@dataclass
class Training:
    """A method made ready on a model: ``step(batch)`` runs one training step."""

    model: nn.Module
    step: Callable[[dict[str, Tensor]], None]
    optimizers: list = field(default_factory=list)
    state: Callable[[], list[Tensor]] = lambda: []
    trainable: int = 0


class MasterWeights:
    """Standard mixed-precision training: fp16 weights, an fp32 master copy that the optimizer updates.

    As DeepSpeed's fp16 optimizers and apex O2 do it, and as the LOMO paper counts it (the master weights are
    optimizer state: AdamW holds 12 bytes per parameter, SGD 4). After backward every fp16 gradient exists;
    the update then runs one tensor at a time, like DeepSpeed's sub-groups: the fp16 gradient becomes an fp32
    gradient of the master (inside the optimizer's step, so MemTracker counts it with the optimizer), the rule
    updates the master, and the master is copied back into the fp16 weight.
    """

    def __init__(self, params: list[nn.Parameter], optimizer_class: type, **kwargs: Any):
        self.params = params
        self.master = [p.detach().float() for p in params]
        self.optimizer = optimizer_class(self.master, foreach=False, **kwargs)
        self.optimizer.register_step_pre_hook(self._take_gradient)
        self._current: tuple[nn.Parameter, Tensor] | None = None

    def _take_gradient(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        param, master = self._current
        master.grad = param.grad.float()
        param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for current in zip(self.params, self.master):
            self._current = current
            self.optimizer.step()  # only this master has a gradient
            param, master = current
            master.grad = None
            param.copy_(master)


def _fake_safe(updater_class: type) -> type:
    """The engine without its check that the loss is finite: a fake loss has no value to check."""

    class FakeTensorUpdater(updater_class):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # fp16 weights get a dynamic loss scaler, whose overflow check reads the gradient norm (a value a
            # fake tensor lacks) in a first backward that frees every gradient at once: it adds no peak
            self.loss_scaler = None

        def loss_is_finite(self, loss: Tensor) -> bool:
            return True

    return FakeTensorUpdater


def lora_parameter_count(config) -> int:
    """Rank-r LoRA on every projection of every block, as peft counts it (:func:`harness.methods.lora_parameter_count`)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # peft's modules are built for real (on the meta device)
        return methods.lora_parameter_count(config, LORA_RANK)


def sft_density(config) -> float:
    """SFT's density at LoRA's trainable count (the same at every depth)."""
    h, i = config.hidden_size, config.intermediate_size
    return lora_parameter_count(config) / (config.num_hidden_layers * (4 * h * h + 3 * h * i))


def training_loss(model: nn.Module, batch: dict[str, Tensor], setting: Setting) -> Tensor:
    """The loss as ``CausalLMModule.compute_loss`` computes it, with ``setting``'s ``loss_chunk_tokens``, in the forward
    context of its ``training_step`` (activation offloading where ``setting.offloading``)."""
    from lomo_lightning import chunked_causal_lm_loss
    from lomo_lightning.activations import ActivationOffloading
    from lomo_lightning.objectives.causal_lm import auto_chunk_tokens

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's LoRA: the Llama inside
    chunk_tokens = setting.loss_chunk_tokens
    if chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(causal_lm, batch["input_ids"])
    # the host of the offloaded tensors is the meta device, so the tracker counts them apart from the device's
    with ActivationOffloading(host="meta") if setting.offloading else contextlib.nullcontext():
        if chunk_tokens is None:
            return model(**batch).loss
        return chunked_causal_lm_loss(causal_lm, chunk_tokens=int(chunk_tokens), **batch)


def prepare(method: str, model: nn.Module, setting: Setting, group: Any = None) -> Training:
    """Set ``method`` up on ``model``; ``group``: the shard group when the model is sharded by FSDP2."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    from lomo_lightning import AdaLomo, FusedUpdater, Lomo
    from lomo_lightning.optim import SM3
    from lomo_lightning.optim.base import write_back_of
    from lomo_lightning.optim.rounding import WriteBack
    from lomo_lightning.selection import HalfFineTuning, SparseFineTuning
    from lomo_lightning.strategies.fsdp import ShardedFusedUpdater

    def loss(batch: dict[str, Tensor]) -> Tensor:
        return training_loss(model, batch, setting)

    if method == "floor":
        for param in model.parameters():
            param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        return Training(model, lambda batch: loss(batch).backward(), trainable=_numel(model.parameters()))

    if method in ("adamw", "sgd"):
        params = list(model.parameters())
        if method == "adamw":
            master = MasterWeights(params, torch.optim.AdamW, lr=1e-5)
        else:
            master = MasterWeights(params, torch.optim.SGD, lr=1e-3)

        def standard_step(batch: dict[str, Tensor]) -> None:
            loss(batch).backward()
            master.step()

        return Training(model, standard_step, [master.optimizer], lambda: master.master, _numel(params))

    if method == "lora":  # the adapters are in the model already (build_model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)

        def lora_step(batch: dict[str, Tensor]) -> None:
            loss(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Training(model, lora_step, [optimizer], trainable=_numel(params))

    sft = None
    if method == "hft":
        HalfFineTuning(ratio=0.5, seed=0).apply(model)
    if method == "sft":
        # LoRA's budget; no reselection within the two steps (it runs after backward, when no gradient exists)
        sft = SparseFineTuning(
            num_tunable_weights=lora_parameter_count(model.config), regrowth="sm3", reselection_steps=10**9, total_steps=10**9
        )
        with unset_fake_temporarily():  # the initial active sets are drawn with real random numbers
            sft.apply(model)
        if isinstance(next(model.parameters()), FakeTensor):
            # then made fake like the rest of the model: a real tensor that meets fake ones is converted on every
            # use, and the tracker counts each conversion
            for layer in sft.layers.values():
                layer.indices = layer.indices.clone()
                layer.values = nn.Parameter(layer.values.detach().clone())
    params = sft.parameters() if sft is not None else [p for p in model.parameters() if p.requires_grad]
    rule = {"lomo": Lomo, "sft": SM3}.get(method, AdaLomo)(params, lr=1e-3)  # SpIEL-MA's rule for SFT's values
    # stochastic rounding keys its bits on the step count and the shard's offset, values a fake tensor (and a
    # fake process group) lack: key them on zeros, which draws the same bits in the same memory
    rule.write_back = lambda param, group, state: (
        WriteBack("stochastic", key=(group["seed"], 0, 0)).write(param.device)
        if group["rounding"] == "stochastic" else write_back_of(param, group, state, step=0, position=0)
    )
    # the rule learns each parameter's facts when the engine attaches, its shard offset among them: zeros too
    with mock.patch("lomo_lightning.optim.base.flat_offset", lambda param: 0):
        if group is None:
            updater = _fake_safe(FusedUpdater)(model, rule)
        else:
            updater = _fake_safe(ShardedFusedUpdater)(model, rule, group=group)

    def fused_step(batch: dict[str, Tensor]) -> None:
        updater.backward(loss(batch))

    state = (lambda: methods.sft_state(sft)) if sft is not None else (lambda: [])
    trainable = sft.budget if sft is not None else _numel(params)
    return Training(model, fused_step, [rule], state, trainable)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------------------
# one measurement


@contextlib.contextmanager
def _adalomo_blocks(elements: int | None):
    from lomo_lightning.optim import adalomo

    saved = adalomo._BLOCK_ELEMENTS
    if elements is not None:
        adalomo._BLOCK_ELEMENTS = elements
    try:
        yield
    finally:
        adalomo._BLOCK_ELEMENTS = saved


def measure(config, method: str, setting: Setting, *, fake: bool = True,
            adalomo_blocks: int | None = ADALOMO_BLOCK_ELEMENTS) -> dict[str, Any]:
    """Peak memory of one training step of ``method`` on a Llama built from ``config``.

    One untracked warm-up step first (optimizer state then exists, as in every later step), then one tracked
    step. ``fake=False`` runs the same on real tensors (to check the fake-tensor figure on a small model).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lomo_lightning.device_memory import assumed_device_memory

    if setting.offloading and not fake:
        raise ValueError("memory_scale: offloading is estimated on fake tensors only (its host is the meta device)")
    start = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(fake_mesh(setting.world)) if setting.world > 1 else None
        stack.enter_context(mode)
        stack.enter_context(_adalomo_blocks(adalomo_blocks))
        stack.enter_context(assumed_device_memory(setting.device_gib * GIB))
        torch.manual_seed(0)
        model = build_model(config, setting, lora=method == "lora")
        if mesh is not None:
            from lomo_lightning.strategies.fsdp import shard_transformers

            # as strategy="lomo_fsdp" does: each unit (chosen for the card under "auto"), then the model
            shard_transformers(model, mesh, unit=setting.fsdp_units)
        unit = None
        if mesh is not None:
            from torch.distributed.fsdp import FSDPModule

            units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
            unit = "projection" if any(isinstance(m, nn.Linear) for m in units) else "block"
        training = prepare(method, model, setting, group=mesh.get_group() if mesh is not None else None)
        batch = padded_batch(config.vocab_size, setting)
        training.step(batch)
        peak = peak_by_category(lambda: training.step(batch), training.model, training.optimizers, training.state())
    return {
        "method": method,
        "layers": config.num_hidden_layers,
        "trainable": training.trainable,
        "peak_bytes": sum(peak.values()),
        "peak_by_category_bytes": peak,
        "wall_s": round(time.perf_counter() - start, 1),
        **({"fsdp_unit": unit} if unit else {}),
    }


def padded_batch(vocab_size: int, setting: Setting) -> dict[str, Tensor]:
    """Random tokens with an attention mask in which one sequence is left-padded by one token.

    Fine-tuning batches are padded, and Hugging Face then builds an explicit causal mask (batch x 1 x seq x seq,
    bool) for SDPA. It builds the same for fake inputs, whose padding it cannot inspect, so the padding keeps
    real and fake steps on the same path.
    """
    input_ids = torch.randint(0, vocab_size, (setting.batch, setting.seq))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 0] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class MeasurementError(Exception):
    """A measurement made ahead (:func:`measure_ahead`) failed; the message is its error's."""


# Measurements made ahead by worker processes, and the list that records them while the report is only planned.
_MEASURED: dict[tuple, dict[str, Any]] = {}
_PLANNED: list[tuple] | None = None
_CACHED_ONLY = False  # --cached-only: what the cache lacks is reported as not measured


def measure_llama(size: str, method: str, layers: int, setting: Setting, **kwargs: Any) -> dict[str, Any]:
    """:func:`measure` on LLaMA-``size`` cut to ``layers`` blocks (made ahead by :func:`measure_ahead` if it was)."""
    key = (size, method, layers, setting, kwargs.get("adalomo_blocks", ADALOMO_BLOCK_ELEMENTS))
    if _PLANNED is not None:  # planning: a stand-in of the right shape, the request recorded
        _PLANNED.append(key)
        zeros = dict.fromkeys(CATEGORIES + ["gathered_parameters"], 0)
        return {"method": method, "layers": layers, "trainable": 0, "peak_bytes": 1, "peak_by_category_bytes": zeros,
                "wall_s": 0.0, "size": size}
    if key in _MEASURED:
        result = _MEASURED[key]
        if "error" in result:
            raise MeasurementError(result["error"])
        return result
    if _CACHED_ONLY:
        raise MeasurementError("not measured (not in the cache)")
    return dict(measure(llama_config(size, layers), method, setting, **kwargs), size=size)


def _measure_key(key: tuple) -> tuple[tuple, dict[str, Any]]:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    size, method, layers, setting, adalomo_blocks = key
    try:
        return key, measure_llama(size, method, layers, setting, adalomo_blocks=adalomo_blocks)
    except Exception as error:  # noqa: BLE001 - a method that cannot run is a result, with its reason
        return key, {"error": f"{type(error).__name__}: {error}"}


def _cache_key(key: tuple) -> str:
    size, method, layers, setting, adalomo_blocks = key
    return json.dumps([size, method, layers, asdict(setting), adalomo_blocks])


def measure_ahead(build: Callable[[], Any], workers: int, log: Callable[[str], None], cache: Path | None = None) -> None:
    """Run every measurement ``build()`` asks for in ``workers`` processes (deepest first), then keep the results
    for ``measure_llama``. ``build`` runs once to plan, on stand-ins; measurements are independent steps.

    ``cache``: a JSON-lines file of earlier results, reused (delete it when the code changes); each new result is
    appended as it comes, so an interrupted run loses nothing measured."""
    global _PLANNED
    _PLANNED = []
    try:
        build()
        keys = list(dict.fromkeys(_PLANNED))
    finally:
        _PLANNED = None
    if cache is not None and cache.is_file():
        earlier = {}
        for line in cache.read_text().splitlines():
            entry = json.loads(line)
            earlier[entry["key"]] = entry["result"]
        for key in keys:
            if _cache_key(key) in earlier:
                _MEASURED[key] = earlier[_cache_key(key)]
        keys = [key for key in keys if key not in _MEASURED]
        log(f"{len(_MEASURED)} measurements from {cache}")
    if _CACHED_ONLY:
        return
    keys.sort(key=lambda k: -k[2] * (3 if k[3].world > 1 else 1))  # the longest first, so they do not finish last
    log(f"{len(keys)} measurements in {workers} processes")
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for key, result in pool.imap_unordered(_measure_key, keys):
            _MEASURED[key] = result
            if cache is not None:
                with cache.open("a") as file:
                    file.write(json.dumps({"key": _cache_key(key), "result": result}) + "\n")
            size, method, layers, setting, _ = key
            where = f"per rank of {setting.world}, unit {setting.fsdp_units}" if setting.world > 1 else "one device"
            what = result.get("error") or f"{result['peak_bytes'] / GIB:.3f} GiB in {result['wall_s']:.0f} s"
            log(f"  {size} {method} at {_blocks(layers)} ({where}, {_options_text(setting)}): {what}")


def _parameter_count(size: str, layers: int) -> int:
    h, i = LLAMA1[size]["hidden"], LLAMA1[size]["intermediate"]
    return 2 * VOCAB * h + h + layers * (4 * h * h + 3 * h * i + 2 * h)


@contextlib.contextmanager
def fake_mesh(world: int):
    """A 1-D device mesh over a fake process group of ``world`` ranks (this process is rank 0), for the block.

    Collectives on the fake group return at once and move nothing; FSDP2 and the fused engine run their rank-0
    code path, allocating what rank 0 would.
    """
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


# ---------------------------------------------------------------------------------------------------------
# depth: measure a few, extrapolate to all


def extrapolate(rows: list[dict[str, Any]], layers: int) -> dict[str, Any]:
    """The peak at ``layers`` blocks on the line through the two deepest measurements (total and each category).

    Where the peak falls can move as blocks are added (a one-block model may peak at the loss, a deep one after
    backward); the deepest measurements are the most like the real model. The other depths check the line:
    ``max_residual_bytes`` is their largest distance from it.
    """
    ordered = sorted(rows, key=lambda r: r["layers"])
    shallow, deep = ordered[-2], ordered[-1]

    def at(value: Callable[[dict[str, Any]], float], depth: int) -> float:
        slope = (value(deep) - value(shallow)) / (deep["layers"] - shallow["layers"])
        return value(deep) + slope * (depth - deep["layers"])

    total = lambda r: r["peak_bytes"]  # noqa: E731
    return {
        "layers": layers,
        "peak_bytes": at(total, layers),
        "peak_by_category_bytes": {
            category: at(lambda r, c=category: r["peak_by_category_bytes"][c], layers)
            for category in deep["peak_by_category_bytes"]
        },
        "bytes_per_block": at(total, deep["layers"] + 1) - deep["peak_bytes"],
        "max_residual_bytes": max(abs(at(total, r["layers"]) - r["peak_bytes"]) for r in ordered),
        "measured_depths": [r["layers"] for r in ordered],
    }


def sweep(sizes: list[str], depths: dict[str, list[int]], setting: Setting, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every size x method (the keys of ``depths``): measured at its depths, extrapolated to the real depth."""
    estimates = []
    for size in sizes:
        for method, method_depths in depths.items():
            measured = []
            for layers in sorted(method_depths):
                try:
                    measured.append(measure_llama(size, method, layers, setting))
                except Exception as error:  # noqa: BLE001 - a method that cannot run is a result, with its reason
                    log(f"  {size} {method} at {layers} blocks failed: {type(error).__name__}: {error}")
                    estimates.append({"size": size, "method": method, "error": f"{type(error).__name__}: {error}"})
                    break
            else:
                estimate = extrapolate(measured, LLAMA1[size]["layers"])
                estimate.update(size=size, method=method, parameters=_parameter_count(size, LLAMA1[size]["layers"]),
                                trainable_at_measured_depths=[r["trainable"] for r in measured], measured=measured)
                estimates.append(estimate)
                log(f"  {size} {method}: {estimate['peak_bytes'] / GIB:.2f} GiB "
                    f"({estimate['bytes_per_block'] / GIB:.3f} GiB a block, residual {estimate['max_residual_bytes'] / 2**20:.1f} MiB, "
                    f"{sum(r['wall_s'] for r in measured):.0f} s)")
    return estimates


def check_full_depth(pairs: list[tuple[str, str]], estimates: list[dict[str, Any]], setting: Setting,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``(size, method)`` at its real depth and compare with the extrapolated estimate."""
    checks = []
    for size, method in pairs:
        full = measure_llama(size, method, LLAMA1[size]["layers"], setting)
        estimate = next((e for e in estimates if e["size"] == size and e["method"] == method and "error" not in e), None)
        check = {"size": size, "method": method, "full_depth": full}
        if estimate is not None:
            check["extrapolated_bytes"] = estimate["peak_bytes"]
            check["relative_error"] = estimate["peak_bytes"] / full["peak_bytes"] - 1
        checks.append(check)
        log(f"  {size} {method} at full depth ({full['layers']} blocks): {full['peak_bytes'] / GIB:.3f} GiB in {full['wall_s']:.0f} s"
            + (f"; extrapolated {check['extrapolated_bytes'] / GIB:.3f} GiB ({100 * check['relative_error']:+.3f}%)" if estimate else ""))
    return checks


def check_adalomo_blocks(size: str, setting: Setting, log: Callable[[str], None]) -> dict[str, Any]:
    """AdaLomo at one block with the library's own row blocks against the enlarged ones used everywhere else."""
    enlarged = measure_llama(size, "adalomo", 1, setting)
    exact = measure_llama(size, "adalomo", 1, setting, adalomo_blocks=None)
    log(f"  {size} adalomo at 1 block: {exact['peak_bytes'] / GIB:.4f} GiB with the library's row blocks "
        f"({exact['wall_s']:.0f} s), {enlarged['peak_bytes'] / GIB:.4f} GiB with {ADALOMO_BLOCK_ELEMENTS:,}-element blocks")
    return {"size": size, "exact": exact, "enlarged": enlarged, "difference_bytes": enlarged["peak_bytes"] - exact["peak_bytes"]}


# ---------------------------------------------------------------------------------------------------------
# report


def environment() -> dict[str, Any]:
    import transformers

    return env.environment(transformers=transformers.__version__)


def _category_cells(categories: dict[str, float], names: list[str]) -> str:
    return " | ".join(f"{gib(categories.get(name, 0.0)):.2f}" for name in names)


def _unit_text(row: dict[str, Any]) -> str:
    """``auto (projection)``: the unit asked for, and the one ``auto`` took."""
    chosen = row.get("fsdp_unit") or next((m.get("fsdp_unit") for m in row.get("measured", []) if m.get("fsdp_unit")), None)
    chosen = chosen or row.get("full_depth", {}).get("fsdp_unit")
    return f"{row['fsdp_units']} ({chosen})" if row["fsdp_units"] == "auto" and chosen else row["fsdp_units"]


def _options_text(setting: Setting) -> str:
    chunks = {"auto": "loss chunking auto", None: "full logits"}.get(setting.loss_chunk_tokens, f"chunks of {setting.loss_chunk_tokens}")  # type: ignore[arg-type]
    return f"{chunks}, offloading {'on' if setting.offloading else 'off'}"


def _blocks(count: int) -> str:
    return f"{count} block" + ("s" if count != 1 else "")


def _depth_text(depths: dict[str, list[int]]) -> str:
    common = max((d for d in depths.values()), key=list(depths.values()).count)
    others = [f"{LABELS[m].split(' (')[0]}: {', '.join(map(str, d))}" for m, d in depths.items() if d != common]
    return ", ".join(map(str, common)) + (f" blocks ({'; '.join(others)})" if others else " blocks")


def markdown(report: dict[str, Any]) -> str:
    setting = Setting(**report["setting"])
    estimates = [e for e in report["estimates"] if "error" not in e]
    by_key = {(e["size"], e["method"]): e for e in estimates}
    lines = [
        "# Peak training memory of LLaMA-7B to 65B, estimated with fake tensors",
        "",
        f"`python benchmarks/memory_scale.py{report['command_suffix']}`: MemTracker peak of one training step (after a "
        f"warm-up step) under `FakeTensorMode`, LLaMA-1 shapes, vocabulary {VOCAB}; {setting.describe()}. Each figure is "
        f"extrapolated from the depths {_depth_text(report['depths'])}: the line through the two deepest; GiB.",
        "",
    ]
    if "7b" in report["sizes"]:
        lines += [
            "## LLaMA-7B against the LOMO paper (Lv et al., 2023, Table 1)",
            "",
            "| method | estimate | parameters | gradients | optimizer state | activations | temporaries | paper | estimate / paper |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method in report["methods"]:
            estimate = by_key.get(("7b", method))
            if estimate is None:
                continue
            paper = PAPER_7B.get(method)
            cells = _category_cells(estimate["peak_by_category_bytes"], CATEGORIES[:5])
            versus = f"{paper['total']:.2f} | {gib(estimate['peak_bytes']) / paper['total']:.3f}" if paper else "– | –"
            lines.append(f"| {LABELS[method]} | **{gib(estimate['peak_bytes']):.2f}** | {cells} | {versus} |")
        lines.append("")
    lines += ["## Every size", "", "| method | " + " | ".join(s.upper() for s in report["sizes"]) + " |",
              "|---|" + "---|" * len(report["sizes"])]
    for method in report["methods"]:
        cells = []
        for size in report["sizes"]:
            estimate = by_key.get((size, method))
            cells.append(f"{gib(estimate['peak_bytes']):.1f}" if estimate else "error")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines.append("| parameters (billions) | " + " | ".join(f"{_parameter_count(s, LLAMA1[s]['layers']) / 1e9:.2f}" for s in report["sizes"]) + " |")
    errors = [e for e in report["estimates"] if "error" in e]
    if errors:
        lines += ["", "Not estimated: " + "; ".join(f"{e['size']} {e['method']}: {e['error']}" for e in errors)]
    lines.append("")
    if report.get("fsdp"):
        fsdp = report["fsdp"]
        world_setting = Setting(**fsdp["setting"])
        names = ["parameters", "gathered_parameters", "gradients", "optimizer_state", "activations", "temporaries"]
        lines += [
            f"## Per rank under `lomo_fsdp` on {world_setting.world} ranks (FSDP2, fake process group)",
            "",
            f"{world_setting.describe()}; extrapolated from the depths {', '.join(map(str, fsdp['depths']))} blocks.",
            "",
            "| model | method | FSDP2 unit | per rank | sharded parameters | gathered parameters | gradients | optimizer state | activations | temporaries | under 24 GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for estimate in fsdp["estimates"]:
            if "error" in estimate:
                lines.append(f"| {estimate['size'].upper()} | {LABELS[estimate['method']]} | {estimate['fsdp_units']} | error: {estimate['error']} |" + " |" * 7)
                continue
            fits = "yes" if estimate["peak_bytes"] < GPU_24GB else "no"
            lines.append(f"| {estimate['size'].upper()} | {LABELS[estimate['method']]} | {_unit_text(estimate)} | **{gib(estimate['peak_bytes']):.2f}** | "
                         f"{_category_cells(estimate['peak_by_category_bytes'], names)} | {fits} |")
        lines.append("")
    if report.get("options"):
        lines += [
            "## Each memory option turned off",
            "",
            "The same step with one of the defaults' memory options off (the rows above have them all as the defaults "
            "set them): what each option saves.",
            "",
            "| model | method | where | option | estimate | with the defaults | the option saves |",
            "|---|---|---|---|---|---|---|",
        ]
        defaults = {(e["size"], e["method"], 1): e for e in estimates}
        defaults.update({(e["size"], e["method"], e.get("world", 8)): e for e in (report.get("fsdp") or {}).get("estimates", [])
                         if e["fsdp_units"] == "auto" and "error" not in e})
        for row in report["options"]:
            where = "one device" if row["world"] == 1 else f"per rank of {row['world']}"
            if "error" in row:
                lines.append(f"| {row['size'].upper()} | {LABELS[row['method']]} | {where} | {row['option']} | error: {row['error']} | | |")
                continue
            default = defaults.get((row["size"], row["method"], row["world"]))
            versus = (f"{gib(default['peak_bytes']):.2f} | {gib(row['peak_bytes'] - default['peak_bytes']):.2f}" if default else "– | –")
            lines.append(f"| {row['size'].upper()} | {LABELS[row['method']]} | {where} | {row['option']} | "
                         f"**{gib(row['peak_bytes']):.2f}** | {versus} |")
        lines.append("")
    lines += ["## Checks", "", "| check | extrapolated | measured | error |", "|---|---|---|---|"]
    for check in report["full_depth_checks"]:
        full = check["full_depth"]
        where = f" per rank of {check['world']}, FSDP2 unit {_unit_text(check)}" if check.get("world", 1) > 1 else ""
        lines.append(f"| {check['size'].upper()} {LABELS[check['method']]}{where}, all {full['layers']} blocks ({full['wall_s']:.0f} s) | "
                     f"{gib(check['extrapolated_bytes']):.3f} | {gib(full['peak_bytes']):.3f} | {100 * check['relative_error']:+.3f}% |")
    blocks = report.get("adalomo_block_check")
    if blocks:
        lines.append(f"| {blocks['size'].upper()} AdaLomo at 1 block: the library's row blocks vs {ADALOMO_BLOCK_ELEMENTS:,}-element ones | "
                     f"{gib(blocks['enlarged']['peak_bytes']):.4f} | {gib(blocks['exact']['peak_bytes']):.4f} | "
                     f"{blocks['difference_bytes'] / 2**20:+.1f} MiB |")
    off_line = [e for e in estimates + (report.get("fsdp") or {}).get("estimates", []) if "error" not in e and e["max_residual_bytes"] > 2**20]
    if off_line:
        lines += ["", "The shallowest depth off the line (the peak of a shallow model falls elsewhere in the step): " + "; ".join(
            f"{e['size']} {e['method']}" + (f" (FSDP2, unit per {e['fsdp_units']})" if "fsdp_units" in e else "")
            + f" {e['max_residual_bytes'] / 2**20:.0f} MiB at {_blocks(e['measured_depths'][0])}" for e in off_line)]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fsdp = report.get("fsdp")
    fig, axes = plt.subplots(1, 2 if fsdp else 1, figsize=(14 if fsdp else 8, 5.5), squeeze=False)
    ax = axes[0][0]
    sizes = report["sizes"]
    billions = [_parameter_count(s, LLAMA1[s]["layers"]) / 1e9 for s in sizes]
    for method in report["methods"]:
        points = [(b, gib(e["peak_bytes"])) for s, b in zip(sizes, billions)
                  for e in report["estimates"] if e["size"] == s and e["method"] == method and "error" not in e]
        if points:
            ax.plot(*zip(*points), marker="o", label=LABELS[method])
    if "7b" in sizes:
        seven = billions[sizes.index("7b")]
        for method, paper in PAPER_7B.items():
            ax.scatter([seven], [paper["total"]], marker="x", color="black", zorder=5)
            ax.annotate(f"paper {method} {paper['total']:.1f}", (seven, paper["total"]), textcoords="offset points",
                        xytext=(6, -4), fontsize=7)
    ax.axhline(gib(GPU_24GB), color="grey", linestyle="--", linewidth=1, label="24 GiB (one RTX 3090)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.set_xticks(billions, [s.upper() for s in sizes])
    ax.set_xlabel("LLaMA-1 model")
    ax.set_ylabel("estimated peak (GiB, one device)")
    setting = Setting(**report["setting"])
    ax.set_title(f"One device: {setting.dtype}, batch {setting.batch} x {setting.seq}"
                 + (", activation checkpointing" if setting.checkpointing else ""), fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    if fsdp:
        ax = axes[0][1]
        names = ["parameters", "gathered_parameters", "gradients", "optimizer_state", "activations", "temporaries"]
        rows = [e for e in fsdp["estimates"] if "error" not in e]
        labels = [f"{e['size'].upper()} {LABELS[e['method']].split(',')[0]},\nFSDP2 unit: {e['fsdp_units']}" for e in rows]
        left = [0.0] * len(rows)
        for name in names:
            values = [max(gib(e["peak_by_category_bytes"].get(name, 0.0)), 0.0) for e in rows]
            ax.barh(labels, values, left=left, label=name.replace("_", " "))
            left = [a + b for a, b in zip(left, values)]
        ax.axvline(gib(GPU_24GB), color="black", linestyle="--", linewidth=1, label="24 GiB (RTX 3090)")
        ax.invert_yaxis()
        ax.set_xlabel("estimated peak per rank (GiB)")
        world = Setting(**fsdp["setting"])
        ax.set_title(f"Per rank, lomo_fsdp on {world.world} ranks: {world.dtype}, batch {world.batch} x {world.seq} a rank",
                     fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_pairs(values: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        size, _, method = value.partition(":")
        if size not in LLAMA1 or method not in METHODS:
            raise SystemExit(f"memory_scale: --full-depth takes SIZE:METHOD with SIZE in {sorted(LLAMA1)} and METHOD in {METHODS}, got {value!r}")
        pairs.append((size, method))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(LLAMA1), default=list(LLAMA1))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--depths", nargs="+", type=int,
                        help=f"blocks measured per size and method (default {DEPTHS}, HFT {HFT_DEPTHS})")
    parser.add_argument("--batch", type=int, default=LOMO_TABLE.batch)
    parser.add_argument("--seq", type=int, default=LOMO_TABLE.seq)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=LOMO_TABLE.dtype)
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation")
    parser.add_argument("--full-depth", nargs="*", default=["7b:adalomo"], metavar="SIZE:METHOD",
                        help="also run these at their real depth and compare with the extrapolation")
    parser.add_argument("--fsdp-sizes", nargs="*", choices=list(LLAMA1), default=["65b"], help="per-rank estimates under FSDP2")
    parser.add_argument("--fsdp-methods", nargs="+", choices=["lomo", "adalomo", "adamw"], default=["lomo", "adalomo", "adamw"])
    parser.add_argument("--fsdp-depths", nargs="+", type=int, default=FSDP_DEPTHS)
    parser.add_argument("--fsdp-units", nargs="+", choices=list(FSDP_UNITS), default=["auto", "block"],
                        help="what an FSDP2 unit gathers: auto (lomo_fsdp's default), a block or a projection")
    parser.add_argument("--fsdp-full-depth", action="store_true",
                        help="also run FSDP2 LOMO (the first --fsdp-units) at its real depth (65B: ~6 min)")
    parser.add_argument("--option-sizes", nargs="*", choices=list(LLAMA1), default=["7b", "65b"],
                        help=f"sizes of the rows with one memory option off ({', '.join(OPTIONS)})")
    parser.add_argument("--option-methods", nargs="+", choices=METHODS, default=["lomo", "adalomo"])
    parser.add_argument("--fsdp-option-methods", nargs="*", choices=["lomo", "adalomo", "adamw"], default=["lomo"])
    parser.add_argument("--fsdp-options", nargs="*", choices=list(FSDP_OPTIONS), default=list(FSDP_OPTIONS))
    parser.add_argument("--jobs", type=int, default=1, help="measure in this many processes (each a core and a few GiB)")
    parser.add_argument("--cache", type=Path, help="with --jobs: a JSON-lines file of results kept across runs (of the same code)")
    parser.add_argument("--cached-only", action="store_true", help="with --cache: render what it holds, measure nothing")
    parser.add_argument("--world", type=int, default=LOMO_65B_ON_8.world)
    parser.add_argument("--tag", help="write memory_scale_<tag>.* (required when the setting differs from the LOMO table's)")
    args = parser.parse_args()
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

    global _CACHED_ONLY
    _CACHED_ONLY = args.cached_only
    if args.jobs > 1 or args.cached_only:
        measure_ahead(lambda: build_report(args, setting, lambda message: None), args.jobs, log, args.cache)
    report = build_report(args, setting, log)
    report["wall_s"] = round(time.perf_counter() - started)
    name = "memory_scale" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    plot(report, RESULTS / f"{name}.png")
    log(f"wrote {RESULTS / name}.json, .md and .png")
    print(markdown(report))


def build_report(args: argparse.Namespace, setting: Setting, log: Callable[[str], None]) -> dict[str, Any]:
    """Every estimate, option row and check the arguments ask for, as the report's dictionary."""
    log(f"one device, {setting.describe()}")
    depths = {method: args.depths or (HFT_DEPTHS if method == "hft" else DEPTHS) for method in args.methods}
    estimates = sweep(args.sizes, depths, setting, log)
    checks = []
    pairs = parse_pairs(args.full_depth)
    if pairs:
        log("full-depth checks")
        checks = check_full_depth(pairs, estimates, setting, log)
    block_check = None
    if any(e["method"] in ("adalomo", "hft", "sft") for e in estimates) and "7b" in args.sizes:
        log("AdaLomo row-block check")
        block_check = check_adalomo_blocks("7b", setting, log)
    fsdp = None
    options = []
    for option, overrides in OPTIONS.items():
        option_depths = {method: depths.get(method) or args.depths or (HFT_DEPTHS if method == "hft" else DEPTHS)
                         for method in args.option_methods}
        for estimate in sweep(args.option_sizes, option_depths, replace(setting, **overrides), log):
            options.append(dict(estimate, option=option, world=1))
    if args.fsdp_sizes:
        fsdp = {"setting": asdict(replace(LOMO_65B_ON_8, dtype=args.dtype, world=args.world)),
                "depths": sorted(args.fsdp_depths), "estimates": []}
        for units in args.fsdp_units:
            world_setting = replace(LOMO_65B_ON_8, dtype=args.dtype, world=args.world, fsdp_units=units)
            log(f"FSDP2, {world_setting.describe()}")
            fsdp_depths = {method: args.fsdp_depths for method in args.fsdp_methods}
            for estimate in sweep(args.fsdp_sizes, fsdp_depths, world_setting, log):
                fsdp["estimates"].append(dict(estimate, fsdp_units=units))
        if args.fsdp_full_depth:
            world_setting = replace(LOMO_65B_ON_8, dtype=args.dtype, world=args.world, fsdp_units=args.fsdp_units[0])
            estimates_of_units = [e for e in fsdp["estimates"] if e["fsdp_units"] == world_setting.fsdp_units]
            for check in check_full_depth([(size, "lomo") for size in args.fsdp_sizes], estimates_of_units, world_setting, log):
                checks.append(dict(check, world=world_setting.world, fsdp_units=world_setting.fsdp_units))
        world_setting = replace(LOMO_65B_ON_8, dtype=args.dtype, world=args.world)
        fsdp_depths = {method: args.fsdp_depths for method in args.fsdp_option_methods}
        for option in args.fsdp_options:
            for estimate in sweep(args.fsdp_sizes, fsdp_depths, replace(world_setting, **FSDP_OPTIONS[option]), log):
                options.append(dict(estimate, option=option, world=world_setting.world, fsdp_units=world_setting.fsdp_units))
    return {
        "command_suffix": " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "",
        "setting": asdict(setting),
        "sizes": args.sizes,
        "methods": args.methods,
        "depths": depths,
        "estimates": estimates,
        "full_depth_checks": checks,
        "adalomo_block_check": block_check,
        "fsdp": fsdp,
        "options": options,
        "paper_7b_gib": PAPER_7B,
        "notes": {
            "units": "bytes in the JSON; GiB (2**30 bytes) in the tables; the LOMO paper's 'GB' are GiB",
            "extrapolation": "a line through the two deepest measured depths, evaluated at the real depth; "
            "max_residual_bytes is the largest distance of a measured depth from it",
            "adalomo_blocks": f"AdaLomo's column sums run over row blocks of {ADALOMO_BLOCK_ELEMENTS:,} elements instead of the library's "
            "2**18, which only makes the fake-tensor step faster (see adalomo_block_check)",
            "lora": f"peft LoRA r={LORA_RANK}, alpha {2 * LORA_RANK} on {', '.join(LORA_TARGETS)}; AdamW on the (fp32) adapters",
            "sft": "SparseFineTuning(regrowth='sm3') at LoRA's trainable count (SpIEL-MA), the SM3 rule fused on its values; "
            "an ordinary step (the reselection runs after backward, when no gradient exists); its sampled weight gradient "
            "is the custom operator lomo_lightning::sampled_gradient, counted by its result (k floats)",
            "defaults": "loss_chunk_tokens and the FSDP2 unit 'auto', decided for a card of device_gib GiB; activation "
            "offloading on (what 'auto' does on a GPU with checkpointing), its tensors held on the meta device, standing "
            "for the host, and left out of the figures",
        },
        "environment": environment(),
    }


if __name__ == "__main__":
    main()
