"""16-bit parameters on a real model: does bf16 training keep fp32's gains, at what memory and time?

SmolLM2-135M-Instruct (offline, ``lomo_lightning.models.smollm2_directory``), batches of 2 x 128 tokens of
the Python standard library through SmolLM2's own tokenizer (the same batches for every run), fused
updates (``FusedUpdater``)::

    python benchmarks/precision.py                           # everything: hours on 2 shared CPU cores
    python benchmarks/precision.py --parts memory timing     # a subset; merged into the previous results
    python benchmarks/precision.py --parts quality --only adalomo_fp32 adalomo_bf16_stochastic --workers 2

Parts, each run in a fresh process:

- ``quality``: 12 fused AdaLomo steps at lr 5e-4 in fp32 and in bf16 with each rounding (``stochastic``, the
  default; ``kahan``; ``nearest``, what lomo-optim does), and 12 steps of a stock ``torch.optim.AdamW`` at
  lr 2e-5 under the engine in fp32 and in bf16 (stochastic and nearest). The held-out loss (a fixed set of
  validation blocks, files never trained on) is measured before and after, always by an fp32 forward of
  the weights (a bf16 model is upcast for it), so that only the training differs. The gain of a run is
  its start loss minus its end loss; a bf16 run starts from the bf16-rounded checkpoint.
- ``memory``: the MemTracker peak (``torch.distributed._tools.mem_tracker``, deterministic) of one fused
  AdaLomo step after a warm-up step, in fp32 and in bf16 (stochastic rounding), split by category;
  without and with activation checkpointing.
- ``timing``: in fp32 and in bf16, the *floor* (forward and backward, every gradient dropped the moment it
  is ready, no update) and fused AdaLomo with each rounding, interleaved step by step in one process
  (median of the timed steps); for the fused steps also the time spent in the rule itself and, within it,
  in the write-back: on this CPU bf16 matmuls are ~65x slower than fp32 and dominate a bf16 step.

bf16 compute: on this CPU (AVX2, no bf16 instructions) a bf16 matmul is 30-65x slower than an fp32 one, a
SmolLM2 bf16 step takes an hour on a busy 2-core machine. The quality and timing parts therefore run each
matmul with bf16 operands as an fp32 matmul rounded to bf16 (:class:`Bf16MatmulsInFp32`): the numbers of a
GPU's bf16 matmul (exact products, fp32 sums) up to the order of the sums, at fp32 speed. That is also the
honest setting for the step-time ratio: where bf16 matmuls are fast, as on a GPU, the update's share shows.
The memory part runs real bf16.

Results: ``benchmarks/results/precision.json`` (every number, the environment) and ``precision.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import env
from harness.env import RESULTS
from harness.methods import smollm2
from torch.overrides import TorchFunctionMode

PARTS = ("quality", "memory", "timing")

SETTINGS = dict(
    seq_len=128,
    batch_size=2,
    steps=12,
    held_out_blocks=16,
    max_files=600,  # a deterministic sample of stdlib files: tokenized once, cached
    adalomo_lr=5e-4,
    adamw_lr=2e-5,
    timed_steps=3,
    # bf16 matmuls as a GPU runs them (fp32 products and sums of the bf16 operands, rounded to bf16), computed
    # by fp32 matmuls: this CPU's own bf16 matmuls are ~30-65x slower. Quality and timing; memory is real bf16.
    emulate_bf16_matmuls=True,
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


# -- shared by the workers ---------------------------------------------------------------------


def quiet(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env.quiet(threads)


def load_model(dtype: str):
    """SmolLM2-135M-Instruct in train mode; bf16 is the fp32 checkpoint rounded to nearest once."""
    return smollm2("float32").to(getattr(torch, dtype)).train()


def data(settings: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """``(train batches, held-out batches)``: the first ``steps`` shuffled training batches, fixed by the seed."""
    import torch

    from lomo_lightning.data import PythonStdlibDataModule
    from lomo_lightning.models import smollm2_directory

    module = PythonStdlibDataModule(
        tokenizer=smollm2_directory(),
        seq_len=settings["seq_len"],
        batch_size=settings["batch_size"],
        max_files=settings["max_files"],
        max_val_blocks=settings["held_out_blocks"],
        seed=0,
    )
    module.prepare_data()
    module.setup("fit")
    torch.manual_seed(0)  # the loader's shuffle
    train = []
    for batch in module.train_dataloader():
        train.append(batch)
        if len(train) == settings["steps"]:
            break
    return train, list(module.val_dataloader())


def held_out_loss(model, held_out: list[dict]) -> float:
    """Mean loss per predicted token, by an fp32 forward of ``model``'s weights."""
    import torch

    evaluated = copy.deepcopy(model).float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in held_out:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(evaluated(**batch).loss) * n
            count += n
    return total / count


class Bf16MatmulsInFp32(TorchFunctionMode):
    """Runs every matmul with a bf16 operand in fp32 and rounds its result to bf16.

    A GPU's bf16 matmul multiplies the bf16 operands exactly and sums in fp32, then rounds to bf16: an
    fp32 matmul of the operands (exact in fp32) does the same up to the order of the sums. Autograd sees
    the casts, so gradients are bf16 too. Everything else (norms, activations, the loss) runs in bf16 as is.
    """

    MATMULS = {F.linear, F.scaled_dot_product_attention, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            widen = lambda v: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v  # noqa: E731
            return func(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()}).to(torch.bfloat16)
        return func(*args, **kwargs)


def compute_mode(dtype: str, settings: dict[str, Any]):
    """The context a training step of ``dtype`` runs in: :class:`Bf16MatmulsInFp32` if the settings ask for it."""
    if dtype == "bfloat16" and settings["emulate_bf16_matmuls"]:
        return Bf16MatmulsInFp32()
    return contextlib.nullcontext()


def drop_gradients(model) -> list:
    """The floor: every gradient is freed the moment it is ready, and nothing is updated."""

    def drop(param) -> None:
        param.grad = None

    return [p.register_post_accumulate_grad_hook(drop) for p in model.parameters()]


class RuleClock:
    """Time spent in the rule and in the write-back.

    The rule is wrapped before the engine looks it up: ``step_parameter``, and for a rule that splits its
    step (AdaLomo, which the engine drives itself) ``begin_step_parameter`` and both halves of its update.
    """

    write_back_s = 0.0  # one write-back runs at a time: a class-wide counter, read around each step

    def __init__(self, optimizer):
        self.rule_s = 0.0
        step_parameter = optimizer.step_parameter

        def timed_step(*args, **kwargs):
            began = time.perf_counter()
            step_parameter(*args, **kwargs)
            self.rule_s += time.perf_counter() - began

        optimizer.step_parameter = timed_step
        begin_step_parameter = getattr(optimizer, "begin_step_parameter", None)
        if begin_step_parameter is None:
            return

        def timed_halves(update):
            began = time.perf_counter()
            partial = next(update, None)  # None: a whole tensor's update, which ran to its end
            self.rule_s += time.perf_counter() - began
            if partial is None:
                return
            sums = yield partial
            began = time.perf_counter()
            try:
                update.send(sums)
            except StopIteration:
                pass
            self.rule_s += time.perf_counter() - began

        def timed_begin(*args, **kwargs):
            began = time.perf_counter()
            update = begin_step_parameter(*args, **kwargs)
            self.rule_s += time.perf_counter() - began
            return timed_halves(update)

        optimizer.begin_step_parameter = timed_begin

    @classmethod
    def time_write_backs(cls) -> None:
        """Time every eager write-back: the rules' own (``write_`` as Lomo and AdaLomo call it) and the rest's
        (``Write.__call__``: SM3, SFTAdamW, stock rules)."""
        from lomo_lightning.optim import adalomo, lomo, rounding

        def timed(write):
            def timed_write(*args):
                began = time.perf_counter()
                write(*args)
                cls.write_back_s += time.perf_counter() - began

            return timed_write

        for module in (adalomo, lomo):
            module.write_ = timed(module.write_)
        rounding.Write.__call__ = timed(rounding.Write.__call__)

    def take(self) -> tuple[float, float]:
        """``(rule seconds, write-back seconds)`` since the last call."""
        taken = (self.rule_s, RuleClock.write_back_s)
        self.rule_s = RuleClock.write_back_s = 0.0
        return taken


def fused_adalomo(model, settings: dict[str, Any], rounding: str, timed: bool = False):
    """``(engine, optimizer, clock)``: fused AdaLomo; ``timed`` times its rule (``clock`` is ``None`` otherwise)."""
    from lomo_lightning import AdaLomo, FusedUpdater

    optimizer = AdaLomo(model.parameters(), lr=settings["adalomo_lr"], rounding=rounding, seed=0)
    clock = RuleClock(optimizer) if timed else None
    return FusedUpdater(model, optimizer), optimizer, clock


# -- workers -------------------------------------------------------------------------------------


def run_quality(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lomo_lightning import FusedUpdater

    spec = QUALITY_RUNS[name]
    train, held_out = data(settings)
    model = load_model(spec["dtype"])
    start_loss = held_out_loss(model, held_out)
    if spec["rule"] == "adalomo":
        updater, _, _ = fused_adalomo(model, settings, spec.get("rounding", "stochastic"))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["adamw_lr"])
        updater = FusedUpdater(model, optimizer, rounding=spec.get("rounding"), seed=0)
    parameters_before = [p.detach().float().clone() for p in model.parameters()]
    losses, times = [], []
    for batch in train:
        began = time.perf_counter()
        with compute_mode(spec["dtype"], settings):
            loss = model(**batch).loss
            updater.backward(loss)
        times.append(time.perf_counter() - began)
        losses.append(float(loss))
        print(f"{name}: step {len(losses)} loss {losses[-1]:.4f} ({times[-1]:.0f}s)", flush=True)
    changed = sum(int((p.detach().float() != q).sum()) for p, q in zip(model.parameters(), parameters_before))
    moved = sum(float((p.detach().float() - q).abs().sum()) for p, q in zip(model.parameters(), parameters_before))
    end_loss = held_out_loss(model, held_out)
    return {
        **spec,
        "held_out_start": start_loss,
        "held_out_end": end_loss,
        "gain": start_loss - end_loss,
        "train_losses": losses,
        "step_times_s": times,
        "entries_changed": changed / sum(q.numel() for q in parameters_before),
        "total_abs_change": moved,
    }


def run_memory(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``name``: a dtype, optionally ``+checkpointing`` (activation checkpointing of every block)."""
    from harness.memory import peak_by_category
    from torch.distributed._tools.mem_tracker import MemTracker

    dtype, _, checkpointing = name.partition("+")
    os.environ.setdefault("LOMO_LIGHTNING_COMPILE", "0")  # eager rules: MemTracker cannot see into compiled kernels
    train, _ = data(settings)
    model = load_model(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable()
    updater, optimizer, _ = fused_adalomo(model, settings, "stochastic")
    updater.backward(model(**train[0]).loss)  # the optimizer state exists before the tracked step
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        updater.backward(model(**train[1]).loss)
    by_category = peak_by_category(tracker)
    return {
        "dtype": dtype,
        "checkpointing": bool(checkpointing),
        "peak_bytes": sum(by_category.values()),
        "peak_by_category_bytes": by_category,
    }


def run_timing(dtype: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Floor and fused AdaLomo with each rounding, one step of each in turn, on copies of one model."""
    train, _ = data(settings)
    base = load_model(dtype)
    floor = copy.deepcopy(base)
    drop_gradients(floor)
    roundings = ["stochastic", "kahan", "nearest"] if dtype == "bfloat16" else ["stochastic"]  # fp32: no write-back
    RuleClock.time_write_backs()
    fused = {}
    for rounding in roundings:
        model = copy.deepcopy(base)
        updater, _, clock = fused_adalomo(model, settings, rounding, timed=True)
        fused[rounding] = (model, updater, clock)
    del base
    rows: dict[str, dict[str, list[float]]] = {"floor": {"step_s": []}}
    label = {r: f"adalomo_{r}" if dtype == "bfloat16" else "adalomo" for r in roundings}
    rows.update({label[r]: {"step_s": [], "rule_s": [], "write_back_s": []} for r in roundings})
    for step in range(1 + settings["timed_steps"]):  # the first round warms up (and creates the state)
        batch = train[step % len(train)]
        began = time.perf_counter()
        with compute_mode(dtype, settings):
            floor(**batch).loss.backward()
        elapsed = time.perf_counter() - began
        if step:
            rows["floor"]["step_s"].append(elapsed)
        for rounding, (model, updater, clock) in fused.items():
            began = time.perf_counter()
            with compute_mode(dtype, settings):
                updater.backward(model(**batch).loss)
            elapsed = time.perf_counter() - began
            rule_s, write_back_s = clock.take()
            if step:
                row = rows[label[rounding]]
                row["step_s"].append(elapsed)
                row["rule_s"].append(rule_s)
                row["write_back_s"].append(write_back_s)
        print(f"timing {dtype}: round {step} done", flush=True)
    return {"dtype": dtype, "rows": {name: {k: statistics.median(v) for k, v in row.items()} | {"samples": row} for name, row in rows.items()}}


# -- driver ----------------------------------------------------------------------------------------


def run_in_subprocess(part: str, name: str, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    print(f"== {part}: {name}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", part, name, "--settings", json.dumps(settings), "--out", str(out)]
        command += ["--threads", str(threads)]
        began = time.perf_counter()
        completed = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)
        if completed.returncode != 0:
            print(completed.stderr[-4000:], file=sys.stderr)
            return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"}
        result = json.loads(out.read_text())
        result["wall_s"] = time.perf_counter() - began
        return result


def environment() -> dict[str, Any]:
    return env.environment(machine=f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value."""
    quality, memory, timing = results.get("quality", {}), results.get("memory", {}), results.get("timing", {})
    checks = []

    def check(name: str, value: float | None, bound: float, at_least: bool) -> None:
        ok = None if value is None else (value >= bound if at_least else value <= bound)
        checks.append({"target": name, "value": None if value is None else round(value, 4), "bound": bound, "pass": ok})

    def gain_ratio(run: str, reference: str) -> float | None:
        a, b = quality.get(run, {}), quality.get(reference, {})
        return a["gain"] / b["gain"] if "gain" in a and "gain" in b else None

    check("AdaLomo bf16 (stochastic) held-out gain / fp32", gain_ratio("adalomo_bf16_stochastic", "adalomo_fp32"), 0.95, True)
    check("AdaLomo bf16 (Kahan) held-out gain / fp32", gain_ratio("adalomo_bf16_kahan", "adalomo_fp32"), 0.95, True)
    check("AdaLomo bf16 (nearest) held-out gain / fp32 (reported)", gain_ratio("adalomo_bf16_nearest", "adalomo_fp32"), 0.95, True)
    check("AdamW bf16 (engine, stochastic) held-out gain / fp32", gain_ratio("adamw_bf16_stochastic", "adamw_fp32"), 0.9, True)
    for suffix, label in (("", ""), ("+checkpointing", ", activation checkpointing")):
        bf16, fp32 = memory.get(f"bfloat16{suffix}", {}), memory.get(f"float32{suffix}", {})
        ratio = bf16["peak_bytes"] / fp32["peak_bytes"] if "peak_bytes" in bf16 and "peak_bytes" in fp32 else None
        check(f"peak memory, bf16 / fp32 fused AdaLomo{label}", ratio, 0.55, False)
    bf16 = timing.get("bfloat16", {}).get("rows", {})
    step = bf16.get("adalomo_stochastic", {}).get("step_s")
    floor = bf16.get("floor", {}).get("step_s")
    check("bf16 fused AdaLomo (stochastic) step / bf16 floor", step / floor if step and floor else None, 1.10, False)
    return checks


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# 16-bit parameters: SmolLM2-135M-Instruct, fused updates",
        "",
        f"Batches of {settings['batch_size']} x {settings['seq_len']} tokens of the Python standard library "
        f"(SmolLM2's tokenizer), {settings['steps']} steps; held-out loss on {settings['held_out_blocks']} validation "
        "blocks by an fp32 forward of the weights. bf16 matmuls of the quality and timing runs: "
        + ("emulated (fp32 matmuls of the bf16 operands, rounded to bf16)" if settings["emulate_bf16_matmuls"] else "native")
        + "; the memory runs are native bf16. AdaLomo lr "
        f"{settings['adalomo_lr']}, AdamW lr {settings['adamw_lr']}. Machine: {results['environment']['machine']}; "
        f"torch {results['environment']['torch']}; commit {results['environment']['git_commit'][:7]}.",
        "",
        "## Targets",
        "",
        "| target | value | bound | pass |",
        "|---|---|---|---|",
    ]
    for check in results["targets"]:
        verdict = {True: "yes", False: "**no**", None: "not run"}[check["pass"]]
        lines.append(f"| {check['target']} | {check['value']} | {check['bound']} | {verdict} |")
    quality = results.get("quality", {})
    if quality:
        lines += [
            "",
            "## Held-out loss",
            "",
            "| run | held-out start | held-out end | gain | gain / fp32 | entries changed | total abs change | step (s, median) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in quality.items():
            if "error" in row:
                lines.append(f"| {name} | error: {row['error']} |||||||")
                continue
            reference = quality.get(f"{row['rule']}_fp32", {})
            relative = row["gain"] / reference["gain"] if reference.get("gain") else float("nan")
            lines.append(
                f"| {name} | {row['held_out_start']:.4f} | {row['held_out_end']:.4f} | {row['gain']:.4f} | {relative:.3f} "
                f"| {row['entries_changed']:.1%} | {row['total_abs_change']:.4g} | {statistics.median(row['step_times_s']):.1f} |"
            )
    memory = results.get("memory", {})
    if memory:
        lines += ["", "## Peak memory (MemTracker, one fused AdaLomo step)", "",
                  "| run | peak (MiB) | parameters | gradients | optimizer state | activations | temporaries | other |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in memory.items():
            if "error" in row:
                continue
            c = {k: v / 2**20 for k, v in row["peak_by_category_bytes"].items()}
            lines.append(
                f"| {name} | {row['peak_bytes'] / 2**20:.0f} | {c['parameters']:.0f} | {c['gradients']:.0f} | "
                f"{c['optimizer_state']:.0f} | {c['activations']:.0f} | {c['temporaries']:.0f} | {c['other']:.0f} |"
            )
    timing = results.get("timing", {})
    if timing:
        lines += ["", f"## Step time (median of {settings['timed_steps']}, interleaved with the floor in one process)", "",
                  "| dtype | method | step (s) | step / floor | rule (s) | of which write-back (s) | rule / floor |",
                  "|---|---|---|---|---|---|---|"]
        for dtype, result in timing.items():
            if "error" in result:
                continue
            floor = result["rows"]["floor"]["step_s"]
            for name, row in result["rows"].items():
                rule = row.get("rule_s")
                lines.append(
                    f"| {dtype} | {name} | {row['step_s']:.2f} | {row['step_s'] / floor:.3f} | "
                    + (f"{rule:.2f} | {row['write_back_s']:.2f} | {rule / floor:.3f} |" if rule is not None else "| | |")
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--only", nargs="+", help="run only these of the parts' runs (e.g. adalomo_fp32, bfloat16+checkpointing)")
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"])
    parser.add_argument("--timed-steps", type=int, default=SETTINGS["timed_steps"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: steadier on a shared machine)")
    parser.add_argument("--workers", type=int, default=2, help="quality runs at a time, each in its own process")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        quiet(args.threads)
        part, name = args.worker
        worker = {"quality": run_quality, "memory": run_memory, "timing": run_timing}[part]
        Path(args.out).write_text(json.dumps(worker(name, json.loads(args.settings))))
        return

    settings = dict(SETTINGS, steps=args.steps, timed_steps=args.timed_steps)
    path = RESULTS / "precision.json"
    run_environment = dict(environment(), threads_per_process=args.threads)

    def record(part: str, name: str, result: dict[str, Any]) -> dict[str, Any]:
        """Merge one result into the file, read afresh: another invocation may run other parts meanwhile."""
        results = json.loads(path.read_text()) if path.exists() else {}
        if results.get("settings") not in (None, settings):
            results = {}  # other settings: the old numbers are not comparable
        results.update(settings=settings, environment=run_environment)
        results.setdefault(part, {})[name] = dict(result, environment=run_environment)
        results["targets"] = targets(results)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        (RESULTS / "precision.md").write_text(markdown(results))
        return results

    for part in [p for p in PARTS if p in args.parts]:
        names = {"quality": list(QUALITY_RUNS), "memory": MEMORY_RUNS, "timing": ["float32", "bfloat16"]}[part]
        names = [name for name in names if args.only is None or name in args.only]
        workers = args.workers if part == "quality" else 1  # memory is exact anyway; timing runs alone
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(run_in_subprocess, part, name, settings, args.threads): name for name in names}
            for future in as_completed(futures):
                results = record(part, futures[future], future.result())
    print(markdown(results))


if __name__ == "__main__":
    main()
