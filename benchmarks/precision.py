"""16-bit parameters on a real model: does bf16 training keep fp32's gains, and at what memory?

SmolLM2-135M-Instruct, batches of 2 x 128 tokens of the Python standard library through SmolLM2's tokenizer (the same
batches for every run), each method built as ``lomo-train`` builds it (``harness.methods.build``)::

    python benchmarks/precision.py                           # both parts: hours on 2 shared CPU cores
    python benchmarks/precision.py --parts memory            # a part; merged into the previous results
    python benchmarks/precision.py --parts quality --only adalomo_fp32 adalomo_bf16_stochastic --workers 2

Parts, each run in a fresh process:

- ``quality``: 12 fused AdaLomo steps at lr 5e-4 in fp32 and in bf16 with each rounding (``stochastic``, the default;
  ``kahan``; ``nearest``, lomo-optim's), and 12 steps of stock AdamW (lr 2e-5, weight decay 0.01) under the engine in
  fp32 and bf16 (stochastic, nearest). The held-out loss (validation blocks of files never trained on) before and
  after, always by an fp32 forward of the weights; a run's gain is its start loss minus its end loss.
- ``memory``: the MemTracker peak of one fused AdaLomo step after a warm-up step, fp32 and bf16 (stochastic), without
  and with activation checkpointing, by category.

The step time of bf16 against fp32 and the floor is ``compiled_kernels.py``'s (eager and compiled, each write-back);
``results/precision.json`` keeps the ``timing`` of this script's former timing part, which the README quotes.

bf16 compute: this CPU (AVX2) runs a bf16 matmul 30-65x slower than an fp32 one, so the quality runs compute each
matmul with bf16 operands as an fp32 matmul rounded to bf16 (:class:`Bf16MatmulsInFp32`): a GPU's bf16 matmul (exact
products, fp32 sums) up to the order of the sums, at fp32 speed. The memory part runs real bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import torch
import torch.nn.functional as F
from harness import env, memory, methods, training
from harness.env import RESULTS
from harness.methods import smollm2
from torch.overrides import TorchFunctionMode

PARTS = ("quality", "memory")

SETTINGS = dict(
    seq_len=128,
    batch_size=2,
    steps=12,
    held_out_blocks=16,
    max_files=600,  # a deterministic sample of stdlib files: tokenized once, cached
    adalomo_lr=5e-4,
    adamw_lr=2e-5,
    timed_steps=3,  # the former timing part's (kept: a results file merges only runs of the same settings)
    emulate_bf16_matmuls=True,  # quality runs; memory is real bf16
)

QUALITY_RUNS = {  # in the order they run
    "adalomo_fp32": dict(rule="adalomo", dtype="float32"),
    "adamw_fp32": dict(rule="adamw", dtype="float32"),
    "adalomo_bf16_stochastic": dict(rule="adalomo", dtype="bfloat16", rounding="stochastic"),
    "adamw_bf16_stochastic": dict(rule="adamw", dtype="bfloat16", rounding="stochastic"),
    "adalomo_bf16_nearest": dict(rule="adalomo", dtype="bfloat16", rounding="nearest"),
    "adalomo_bf16_kahan": dict(rule="adalomo", dtype="bfloat16", rounding="kahan"),
    "adamw_bf16_nearest": dict(rule="adamw", dtype="bfloat16", rounding="nearest"),
}

MEMORY_RUNS = ["float32", "bfloat16", "float32+checkpointing", "bfloat16+checkpointing"]


# -- shared with compiled_kernels.py


def quiet(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env.quiet(threads)


def load_model(dtype: str) -> Any:
    """SmolLM2-135M-Instruct in train mode; bf16 is the fp32 checkpoint rounded to nearest once."""
    return smollm2("float32").to(getattr(torch, dtype)).train()


class Bf16MatmulsInFp32(TorchFunctionMode):
    """Runs every matmul with a bf16 operand in fp32 and rounds its result to bf16.

    A GPU's bf16 matmul multiplies the bf16 operands exactly and sums in fp32, then rounds to bf16: an fp32 matmul of
    the operands (exact in fp32) does the same up to the order of the sums. Autograd sees the casts, so gradients are
    bf16 too. Everything else (norms, activations, the loss) runs in bf16 as is.
    """

    MATMULS = {F.linear, F.scaled_dot_product_attention, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            widen = lambda v: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v  # noqa: E731
            return func(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()}).to(torch.bfloat16)
        return func(*args, **kwargs)


def compute_mode(dtype: str, settings: dict[str, Any]) -> Any:
    """The context a training step of ``dtype`` runs in: :class:`Bf16MatmulsInFp32` if the settings ask for it."""
    if dtype == "bfloat16" and settings["emulate_bf16_matmuls"]:
        return Bf16MatmulsInFp32()
    return contextlib.nullcontext()


def drop_gradients(model: Any) -> None:
    """The floor: every gradient is freed the moment it is ready, and nothing is updated."""
    methods.floor(model)


def environment() -> dict[str, Any]:
    return env.environment(machine=f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs")


# -- the runs


def data(settings: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """``(train batches, held-out batches)``: the first ``steps`` shuffled training batches, fixed by the seed."""
    from lomo_lightning.data import PythonStdlibDataModule
    from lomo_lightning.models import smollm2_directory

    module = PythonStdlibDataModule(tokenizer=smollm2_directory(), seq_len=settings["seq_len"], batch_size=settings["batch_size"],
                                    max_files=settings["max_files"], max_val_blocks=settings["held_out_blocks"], seed=0)
    module.prepare_data()
    module.setup("fit")
    torch.manual_seed(0)  # the loader's shuffle
    train = []
    for batch in module.train_dataloader():
        train.append(batch)
        if len(train) == settings["steps"]:
            break
    return train, list(module.val_dataloader())


def held_out_loss(model: Any, held_out: list[dict]) -> float:
    """Mean loss per predicted token, by an fp32 forward of ``model``'s weights."""
    return training.evaluate(copy.deepcopy(model).float().eval(), held_out)


def fused(model: Any, rule: str, settings: dict[str, Any], rounding: str = "stochastic") -> methods.Method:
    """Fused AdaLomo (``rounding`` its write-back), or stock AdamW under the engine (the engine's write-back)."""
    from lomo_lightning import FusedUpdater

    if rule == "adalomo":
        overrides = ["method=adalomo", f"method.optimizer.lr={settings['adalomo_lr']}", f"method.optimizer.rounding={rounding}",
                     "+method.optimizer.seed=0"]
        return methods.build(model, overrides)
    overrides = ["method=adamw", "method.fused=true", f"method.optimizer.lr={settings['adamw_lr']}",
                 "method.optimizer.weight_decay=0.01", "method.gradient_clip_val=null"]
    return methods.build(model, overrides, engine=lambda model, rule, **options: FusedUpdater(model, rule, rounding=rounding, seed=0, **options))


def run_quality(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    spec = QUALITY_RUNS[name]
    train, held_out = data(settings)
    model = load_model(spec["dtype"])
    start_loss = held_out_loss(model, held_out)
    method = fused(model, spec["rule"], settings, spec.get("rounding", "stochastic"))
    before = [p.detach().float().clone() for p in model.parameters()]
    losses, times = [], []
    for batch in train:
        began = time.perf_counter()
        with compute_mode(spec["dtype"], settings):
            loss = model(**batch).loss
            method.engine.backward(loss)
        times.append(time.perf_counter() - began)
        losses.append(float(loss))
        print(f"{name}: step {len(losses)} loss {losses[-1]:.4f} ({times[-1]:.0f}s)", flush=True)
    changed = sum(int((p.detach().float() != q).sum()) for p, q in zip(model.parameters(), before))
    moved = sum(float((p.detach().float() - q).abs().sum()) for p, q in zip(model.parameters(), before))
    end_loss = held_out_loss(model, held_out)
    return {**spec, "held_out_start": start_loss, "held_out_end": end_loss, "gain": start_loss - end_loss, "train_losses": losses,
            "step_times_s": times, "entries_changed": changed / sum(q.numel() for q in before), "total_abs_change": moved}


def run_memory(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``name``: a dtype, optionally ``+checkpointing`` (activation checkpointing of every block)."""
    dtype, _, checkpointing = name.partition("+")
    train, _ = data(settings)
    model = load_model(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable()
    method = fused(model, "adalomo", settings)
    method.step(train[0])  # the optimizer state exists before the tracked step
    peak = memory.measure(model, method.step, train[1], method.optimizers, warmup=0, timed=0)
    return {"dtype": dtype, "checkpointing": bool(checkpointing), "peak_bytes": peak["peak_bytes"],
            "peak_by_category_bytes": peak["peak_by_category_bytes"]}


def worker(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``method``: ``PART:NAME``."""
    quiet(spec.pop("threads"))
    part, name = method.split(":")
    return {"quality": run_quality, "memory": run_memory}[part](name, spec)


# -- the report


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value (``timing``: the former timing part's, where present)."""
    quality, peaks = results.get("quality", {}), results.get("memory", {})
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, bound: float, at_least: bool) -> None:
        ok = None if value is None else (value >= bound if at_least else value <= bound)
        checks.append({"target": name, "value": None if value is None else round(value, 4), "bound": bound, "pass": ok})

    def ratio(a: dict, b: dict, key: str) -> float | None:
        return a[key] / b[key] if key in a and key in b else None

    for run, label, bound in (("adalomo_bf16_stochastic", "AdaLomo bf16 (stochastic)", 0.95), ("adalomo_bf16_kahan", "AdaLomo bf16 (Kahan)", 0.95),
                              ("adalomo_bf16_nearest", "AdaLomo bf16 (nearest)", 0.95), ("adamw_bf16_stochastic", "AdamW bf16 (engine, stochastic)", 0.9)):
        label += " held-out gain / fp32" + (" (reported)" if run.endswith("nearest") else "")
        check(label, ratio(quality.get(run, {}), quality.get(f"{run.split('_')[0]}_fp32", {}), "gain"), bound, True)
    for suffix, label in (("", ""), ("+checkpointing", ", activation checkpointing")):
        check(f"peak memory, bf16 / fp32 fused AdaLomo{label}",
              ratio(peaks.get(f"bfloat16{suffix}", {}), peaks.get(f"float32{suffix}", {}), "peak_bytes"), 0.55, False)
    bf16 = results.get("timing", {}).get("bfloat16", {}).get("rows", {})
    step = ratio(bf16.get("adalomo_stochastic", {}), bf16.get("floor", {}), "step_s")
    check("bf16 fused AdaLomo (stochastic) step / bf16 floor", step, 1.10, False)
    return checks


def markdown(results: dict[str, Any]) -> str:
    s, e = results["settings"], results["environment"]
    lines = ["# 16-bit parameters: SmolLM2-135M-Instruct, fused updates", "",
             f"Batches of {s['batch_size']} x {s['seq_len']} tokens of the Python standard library (SmolLM2's tokenizer), {s['steps']} "
             f"steps; held-out loss on {s['held_out_blocks']} validation blocks by an fp32 forward of the weights. bf16 matmuls of the "
             "quality runs: " + ("emulated (fp32 matmuls of the bf16 operands, rounded to bf16)" if s["emulate_bf16_matmuls"] else "native")
             + f"; the memory runs are native bf16. AdaLomo lr {s['adalomo_lr']}, AdamW lr {s['adamw_lr']}. Machine: {e['machine']}; "
             f"torch {e['torch']}; commit {e['git_commit'][:7]}.", "", "## Targets", "",
             "| target | value | bound | pass |", "|---|---|---|---|"]
    lines += [f"| {c['target']} | {c['value']} | {c['bound']} | {({True: 'yes', False: '**no**', None: 'not run'})[c['pass']]} |"
              for c in results["targets"]]
    if quality := results.get("quality"):
        lines += ["", "## Held-out loss", "", "| run | held-out start | held-out end | gain | gain / fp32 | entries changed | total abs change "
                  "| step (s, median) |", "|---|---|---|---|---|---|---|---|"]
        for name, r in quality.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} |||||||")
                continue
            reference = quality.get(f"{r['rule']}_fp32", {}).get("gain")
            lines.append(f"| {name} | {r['held_out_start']:.4f} | {r['held_out_end']:.4f} | {r['gain']:.4f} | "
                         f"{r['gain'] / reference if reference else float('nan'):.3f} | {r['entries_changed']:.1%} | {r['total_abs_change']:.4g} | "
                         f"{statistics.median(r['step_times_s']):.1f} |")
    if peaks := results.get("memory"):
        lines += ["", "## Peak memory (MemTracker, one fused AdaLomo step)", "",
                  "| run | peak (MiB) | parameters | gradients | optimizer state | activations | temporaries | other |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r['peak_bytes'] / 2**20:.0f} | " + " | ".join(f"{v / 2**20:.0f}" for v in r["peak_by_category_bytes"].values()) + " |"
                  for name, r in peaks.items() if "error" not in r]
    if timing := results.get("timing"):
        lines += ["", f"## Step time (the former timing part: median of {s['timed_steps']}, interleaved with the floor in one process; "
                  "`compiled_kernels.py` times this now)", "",
                  "| dtype | method | step (s) | step / floor | rule (s) | of which write-back (s) | rule / floor |", "|---|---|---|---|---|---|---|"]
        for dtype, result in timing.items():
            floor = result["rows"]["floor"]["step_s"]
            for name, r in result["rows"].items():
                rule = f"{r['rule_s']:.2f} | {r['write_back_s']:.2f} | {r['rule_s'] / floor:.3f}" if "rule_s" in r else " | "
                lines.append(f"| {dtype} | {name} | {r['step_s']:.2f} | {r['step_s'] / floor:.3f} | {rule} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if memory.worker_main(worker):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--only", nargs="+", help="run only these of the parts' runs (e.g. adalomo_fp32, bfloat16+checkpointing)")
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: steadier on a shared machine)")
    parser.add_argument("--workers", type=int, default=2, help="quality runs at a time, each in its own process")
    args = parser.parse_args()
    settings = dict(SETTINGS, steps=args.steps)
    path = RESULTS / "precision.json"
    run_environment = dict(environment(), threads_per_process=args.threads)
    # the quality runs keep the rules' default compilation; the memory runs are eager (harness.memory.worker_main)
    quality_env = dict(os.environ, LOMO_LIGHTNING_COMPILE=os.environ.get("LOMO_LIGHTNING_COMPILE", "auto"))
    results: dict[str, Any] = {}
    for part in [p for p in PARTS if p in args.parts]:
        names = [n for n in (QUALITY_RUNS if part == "quality" else MEMORY_RUNS) if args.only is None or n in args.only]
        with ThreadPoolExecutor(max_workers=args.workers if part == "quality" else 1) as pool:
            futures = {pool.submit(memory.in_subprocess, __file__, f"{part}:{name}", dict(settings, threads=args.threads),
                                   quality_env if part == "quality" else None): name for name in names}
            for future in as_completed(futures):
                # merged into the file read afresh (another invocation may run other parts meanwhile); other settings: not comparable
                results = json.loads(path.read_text()) if path.exists() else {}
                results = results if results.get("settings") in (None, settings) else {}
                result = {k: v for k, v in future.result().items() if k != "method"}
                results.update(settings=settings, environment=run_environment)
                results.setdefault(part, {})[futures[future]] = dict(result, environment=run_environment)
                env.write("precision", dict(results, targets=targets(results)), markdown(dict(results, targets=targets(results))))
    print(markdown(dict(results, targets=targets(results))) if results else "nothing run")


if __name__ == "__main__":
    main()
