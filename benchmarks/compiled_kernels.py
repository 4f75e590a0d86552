"""Compiled update kernels against eager ones and the floor, on SmolLM2-135M-Instruct and a ~100M Llama (CPU or GPU).

    python benchmarks/compiled_kernels.py                         # timing (both models, fp32 and bf16), then agreement
    python benchmarks/compiled_kernels.py --parts agreement       # a subset; merged into the previous results
    python benchmarks/compiled_kernels.py --parts timing --models llama_100m --dtypes bfloat16
    python benchmarks/compiled_kernels.py --device cuda --out compiled_kernels_cuda   # what benchmarks/gpu_check.sh runs

Parts, each in a fresh process (so each pays its own compilation):

- ``timing``, per model (``smollm2``: SmolLM2-135M-Instruct; ``llama_100m``: a Llama of 100M parameters from its
  config, random weights, untied embeddings; :data:`LLAMA_100M`) and dtype:
  the *floor* (forward and backward, every gradient dropped the moment it is ready, no update), the *traffic*
  floor (AdaLomo's memory traffic and kernel calls without its arithmetic: :func:`traffic`)
  and fused AdaLomo eager (``compile=False``) and compiled (``compile=True``), in bf16 with each rounding
  (stochastic, Kahan, nearest) and in fp32, all on copies of one model, one step of each in turn (so a
  change of the machine's load hits every row alike); the step is the median of the timed rounds after a
  warm-up round. The compiled rows' warm-up round pays the compilation: its extra time over the eager
  row's warm-up is reported separately as the compile time (the first compiled row pays most of it:
  the kernels are shared). bf16 matmuls run as fp32 matmuls of the bf16 operands
  rounded to bf16 on CPU (``precision.Bf16MatmulsInFp32``: this CPU has no bf16 units), natively on CUDA.
- ``breakdown``: where compiled fused AdaLomo's time goes on SmolLM2 (:func:`run_breakdown`): the hooks, each kernel,
  the rest.
- ``agreement``: the contract per step on SmolLM2. For each of 5 steps, eager and compiled start from the same
  parameters and optimizer state and apply the same gradients (one backward, kept; the rule's unfused ``step()``,
  whose math is the fused engine's: fused = unfused is a contract of the suite), and their results are compared
  element by element: the share bit-identical and the largest distance in units in the last place (the contract:
  >= 99.9% identical and at most 1 unit, at every step). The eager result is the next step's start. Cases
  (``rule:dtype[:rounding]``): AdaLomo in bf16 (stochastic rounding, Kahan) and fp32, LOMO in bf16 (stochastic) and fp32. (Comparing two 5-step trajectories
  instead measures how far 1-unit differences grow, not the kernels: 95.5% identical, an earlier run.)

Batches: 2 x 128 random token ids (the timing and the agreement do not depend on the text).
Results: ``benchmarks/results/<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("timing", "agreement", "breakdown")
MODELS = ("smollm2", "llama_100m")
# ~100M parameters: 8 blocks of hidden 768 (12 heads, 4 key/value heads, MLP 2048) and two 32000 x 768 embeddings
LLAMA_100M: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SETTINGS: dict[str, Any] = dict(
    seq_len=128,
    batch_size=2,
    timed_steps=3,
    agreement_steps=5,
    agreement_cases=["adalomo:bfloat16", "adalomo:bfloat16:kahan", "adalomo:float32", "lomo:bfloat16", "lomo:float32"],
    breakdown_cases=["bfloat16:stochastic", "bfloat16:kahan", "bfloat16:nearest", "float32:nearest"],
    lr=5e-4,
    # the rows timed beside the floor (a smaller set on a busy machine: every row is a model copy and a step)
    timing_runs={
        "bfloat16": ["traffic", "eager_stochastic", "compiled_stochastic", "eager_kahan", "compiled_kahan", "eager_nearest", "compiled_nearest"],
        "float32": ["traffic", "eager", "compiled"],
    },
)


def batches(n: int, settings: dict[str, Any], vocab: int, device: str) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (settings["batch_size"], settings["seq_len"]), generator=generator).to(device)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def fused_adalomo(model, settings: dict[str, Any], rounding: str, compile: bool):
    from lomo_lightning import AdaLomo, FusedUpdater

    optimizer = AdaLomo(model.parameters(), lr=settings["lr"], rounding=rounding, seed=0, compile=compile)
    return FusedUpdater(model, optimizer)


def _traffic_read(grad, param):
    squares = grad.float().square()
    return squares.sum(1), squares.sum(0), param.float().square().sum()


def _traffic_write(param, grad, scale):
    param.copy_(param.float() - grad.float() * scale)


def _traffic_vector(param, grad, scale):
    total = grad.float().square().sum() + param.float().square().sum()
    param.copy_(param.float() - grad.float() * (scale * total))


def traffic(model) -> None:
    """The bytes a compiled AdaLomo step moves, in as many compiled calls, with none of its arithmetic: what a fused
    step would cost if its math were free. A hook per parameter, like the floor's, that for a matrix reads the
    gradient and the parameter in one reduction (sums of squares of the gradient's rows and columns, of the
    parameter) and then both again in an elementwise pass that writes the parameter (``theta - 0 * g``, rounded to
    nearest: unchanged), and for a vector does both in one call; then it drops the gradient."""
    import torch

    from lomo_lightning.optim.compiling import compiled

    zero = torch.zeros(1, device=next(model.parameters()).device)

    def hook(param) -> None:
        grad, param.grad = param.grad, None
        with torch.no_grad():
            if param.dim() >= 2:
                matrix, gradient = param.view(param.shape[0], -1), grad.view(param.shape[0], -1)
                compiled(_traffic_read)(gradient, matrix)
                compiled(_traffic_write)(matrix, gradient, zero)
            else:
                compiled(_traffic_vector)(param, grad, zero)

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(hook)


def compute(dtype: str, device: str):
    """On CPU, bf16 matmuls as fp32 matmuls of bf16 operands (``precision.Bf16MatmulsInFp32``); native elsewhere."""
    import contextlib

    from precision import compute_mode

    if device != "cpu":
        return contextlib.nullcontext()
    return compute_mode(dtype, {"emulate_bf16_matmuls": True})


def build_model(name: str, dtype: str):
    """``smollm2`` (the checkpoint, bf16 rounded to nearest once) or ``llama_100m`` (random weights, seed 0), in train mode."""
    import torch

    if name == "smollm2":
        from precision import load_model

        return load_model(dtype)
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_100M), dtype=getattr(torch, dtype))
    return model.train()


def run_timing(case: str, settings: dict[str, Any], device: str) -> dict[str, Any]:
    import torch
    from precision import drop_gradients

    model_name, dtype = case.split(":")
    base = build_model(model_name, dtype).to(device)
    params = sum(p.numel() for p in base.parameters())
    data = batches(1 + settings["timed_steps"], settings, base.config.vocab_size, device)
    floor = copy.deepcopy(base)
    drop_gradients(floor)
    runs: dict[str, Any] = {"floor": (floor, None)}
    for name in settings["timing_runs"][dtype]:  # "traffic", or "eager" or "compiled" then the rounding in bf16
        mode, _, rounding = name.partition("_")
        model = copy.deepcopy(base)
        if name == "traffic":
            traffic(model)
            runs[name] = (model, None)
        else:
            runs[name] = (model, fused_adalomo(model, settings, rounding or "nearest", mode == "compiled"))
    del base
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for batch in data:  # round 0 warms up (state, compilation)
        for name, (model, updater) in runs.items():
            sync(device)
            began = time.perf_counter()
            with compute(dtype, device):
                loss = model(**batch).loss
                loss.backward() if updater is None else updater.backward(loss)
            sync(device)
            samples[name].append(time.perf_counter() - began)
        print(f"timing {dtype}: round {len(samples['floor'])} done: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in samples.items()), flush=True)
    from torch._dynamo.utils import counters

    rows = {}
    floor_s = statistics.median(samples["floor"][1:])
    for name, times in samples.items():
        step = statistics.median(times[1:])
        rows[name] = {"step_s": step, "step_over_floor": step / floor_s, "warmup_s": times[0], "samples_s": times}
        eager = name.replace("compiled", "eager")
        if name.startswith("compiled") and eager in samples:
            # the warm-up's extra time over the eager warm-up (which also makes the state): compiling
            rows[name]["compile_s"] = times[0] - samples[eager][0]
    return {
        "model": model_name,
        "params": params,
        "dtype": dtype,
        "device": device,
        "rows": rows,
        "graphs": dict(counters["stats"]),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def units_apart(a, b):
    """Representable values of ``a``'s dtype between ``a`` and ``b`` (sign-magnitude order)."""
    import torch

    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    sign = 2 ** (8 * a.element_size() - 1) - 1
    ordered = [x.contiguous().view(bits).long() for x in (a, b)]
    ordered = [torch.where(x < 0, -(x & sign), x) for x in ordered]
    return (ordered[0] - ordered[1]).abs()


def units_at_scale(a, b, start):
    """``|a - b|`` in units in the last place of ``a``'s dtype at the magnitude of ``max(|start|, |a|, |b|)``.

    What an operand's rounding error is measured in: where the update cancels the parameter (a result near 0),
    two results one unit apart at the parameter's scale can be thousands of units apart at their own (a sign
    apart, even), which :func:`units_apart` counts.
    """
    import torch

    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[a.dtype]
    a, b, start = a.double(), b.double(), start.double()
    scale = torch.maximum(start.abs(), torch.maximum(a.abs(), b.abs()))
    _, exponent = torch.frexp(scale)  # scale = m * 2^exponent, m in [0.5, 1)
    smallest = 2.0 ** (-126 - mantissa) if a.dtype != torch.float16 else 2.0**-24
    ulp = torch.ldexp(torch.ones_like(scale), exponent - 1 - mantissa).clamp_(min=smallest)
    return (a - b).abs_().div_(ulp)


def run_agreement(case: str, settings: dict[str, Any], device: str) -> dict[str, Any]:
    """Eager and compiled steps of ``case`` (``rule:dtype``) from the same state with the same gradients, step by step."""
    import torch

    from lomo_lightning import AdaLomo, Lomo

    rule, dtype, *write_back = case.split(":")  # rule:dtype, or rule:dtype:rounding
    base = build_model("smollm2", dtype).to(device)
    data = batches(settings["agreement_steps"], settings, base.config.vocab_size, device)
    rounding = write_back[0] if write_back else "stochastic" if dtype == "bfloat16" else "nearest"
    make = AdaLomo if rule == "adalomo" else Lomo
    reference, other = base, copy.deepcopy(base)  # reference: eager, the trajectory; other: compiled, reset each step
    eager = make(reference.parameters(), lr=settings["lr"], rounding=rounding, seed=0, compile=False)
    compiled = make(other.parameters(), lr=settings["lr"], rounding=rounding, seed=0, compile=True)
    steps = []
    for index, batch in enumerate(data):
        with torch.no_grad():
            for p, q in zip(reference.parameters(), other.parameters()):
                q.copy_(p)
        compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
        with compute(dtype, device):
            reference(**batch).loss.backward()
        for p, q in zip(reference.parameters(), other.parameters()):
            q.grad = p.grad  # the same gradients (neither rule writes them)
        before = [p.detach().clone() for p in reference.parameters()]
        began = time.perf_counter()
        compiled.step()
        compiled_s = time.perf_counter() - began
        eager.step()
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
        pairs = [(p.detach(), q.detach(), b) for p, q, b in zip(reference.parameters(), other.parameters(), before)]
        per_tensor = [units_apart(p, q) for p, q, _ in pairs]
        scaled = [units_at_scale(p, q, b) for p, q, b in pairs]
        elements = sum(d.numel() for d in per_tensor)
        worst = max(range(len(pairs)), key=lambda i: int(per_tensor[i].max()))
        at = int(per_tensor[worst].argmax())
        worst_scaled = max(range(len(pairs)), key=lambda i: float(scaled[i].max()))
        at_scale = int(scaled[worst_scaled].argmax())
        steps.append({
            "step": index + 1,
            "identical_share": sum(int((d == 0).sum()) for d in per_tensor) / elements,
            "max_units_apart": max(int(d.max()) for d in per_tensor),
            "beyond_one_unit": sum(int((d > 1).sum()) for d in per_tensor),
            "max_units_at_scale": max(float(d.max()) for d in scaled),
            "worst_element": {  # the element most units apart: before the step, eager, compiled
                key: float(t.reshape(-1)[at]) for key, t in zip(("start", "eager", "compiled"), (pairs[worst][2], *pairs[worst][:2]))
            },
            "worst_element_at_scale": {  # the element most units apart at the operands' scale
                key: float(t.reshape(-1)[at_scale]) for key, t in zip(("start", "eager", "compiled"), (pairs[worst_scaled][2], *pairs[worst_scaled][:2]))
            },
            "moved_share": sum(int((p != b).sum()) for p, b in zip(reference.parameters(), before)) / elements,
            "compiled_step_s": compiled_s,
        })  # fmt: skip
        print(f"agreement {case}: step {index + 1}: {steps[-1]}", flush=True)
    return {
        "rule": rule,
        "dtype": dtype,
        "rounding": rounding,
        "device": device,
        "elements": elements,
        "steps": steps,
        "min_identical_share": min(s["identical_share"] for s in steps),
        "max_units_apart": max(s["max_units_apart"] for s in steps),
        "max_units_at_scale": max(s["max_units_at_scale"] for s in steps),
        "beyond_one_unit": max(s["beyond_one_unit"] for s in steps),
    }


def run_breakdown(case: str, settings: dict[str, Any], device: str) -> dict[str, Any]:
    """Where compiled fused AdaLomo's time goes on SmolLM2 (``dtype:rounding``): per step, the time in the engine's
    hooks, in each compiled kernel (timers around their calls) and outside them (``sum(theta^2)``'s block sums and the
    Python of 272 updates); the medians of the timed steps after a warm-up step, alone in the process."""
    import collections

    import lomo_lightning.optim.adalomo as adalomo_module

    dtype, rounding = case.split(":")
    model = build_model("smollm2", dtype).to(device)
    data = batches(1 + settings["timed_steps"], settings, model.config.vocab_size, device)
    spent: collections.Counter[str] = collections.Counter()
    original = adalomo_module.compiled

    def timed_compiled(function):
        kernel = original(function)

        def call(*args, **kwargs):
            sync(device)
            began = time.perf_counter()
            out = kernel(*args, **kwargs)
            sync(device)
            spent[function.__name__] += time.perf_counter() - began
            return out

        return call

    adalomo_module.compiled = timed_compiled  # this process only: the kernels the rule calls, timed
    updater = fused_adalomo(model, settings, rounding, True)
    apply_gradient = updater.apply_gradient

    def timed_apply(param, grad=None):
        began = time.perf_counter()
        apply_gradient(param, grad)
        sync(device)
        spent["hooks"] += time.perf_counter() - began

    updater.apply_gradient = timed_apply
    updater.refresh()  # the hooks call the timed method
    steps = []
    for batch in data:
        spent.clear()
        sync(device)
        began = time.perf_counter()
        with compute(dtype, device):
            updater.backward(model(**batch).loss)
        sync(device)
        steps.append(dict(spent, step=time.perf_counter() - began))
    steps = steps[1:]
    kernels = ("adalomo_prepare_", "adalomo_apply_", "adalomo_vector_step_")
    row = {key: statistics.median(step.get(key, 0.0) for step in steps) for key in ("step", "hooks", *kernels)}
    row["outside_kernels"] = statistics.median(step["hooks"] - sum(step.get(key, 0.0) for key in kernels) for step in steps)
    return {"dtype": dtype, "rounding": rounding, "device": device, "steps": len(steps), **row}


def run_in_subprocess(part: str, name: str, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    print(f"== {part}: {name}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", part, name, "--settings", json.dumps(settings), "--result", str(out)]
        command += ["--threads", str(args.threads), "--device", args.device]
        began = time.perf_counter()
        completed = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)
        if completed.returncode != 0:
            print(completed.stderr[-4000:], file=sys.stderr)
            return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr else "failed"}
        result = json.loads(out.read_text())
        result["wall_s"] = time.perf_counter() - began
        return result


def markdown(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    lines = [
        "# Compiled update kernels: fused AdaLomo on SmolLM2-135M-Instruct and a ~100M Llama; the per-step contract",
        "",
        f"Batches of {results['settings']['batch_size']} x {results['settings']['seq_len']} random tokens; lr "
        f"{results['settings']['lr']}. Device: {env.get('device')}; machine: {env.get('machine')}; torch {env.get('torch')}; "
        f"{env.get('threads')} torch thread(s); commit {str(env.get('git_commit'))[:7]}; {env.get('date')}. Timings on a "
        "machine shared with other jobs are noisy: compare the ratios of one run (every row's steps interleaved); the "
        "load average (1, 5, 15 min) at the end of each timing run is given.",
        "",
    ]
    timing = results.get("timing", {})
    if timing:
        lines += [
            f"## Step time (median of {results['settings']['timed_steps']} interleaved rounds after a warm-up round)",
            "",
            "*floor*: forward and backward, each gradient dropped when ready, no update. *traffic*: the floor plus the bytes a "
            "compiled AdaLomo step moves, in as many compiled calls (per matrix a reduction reading the gradient and the "
            "parameter, then a pass reading both and writing the parameter back unchanged), with none of its arithmetic: "
            "what a fused step would cost if its math were free.",
            "",
            "| model | dtype | run | step (s) | step / floor | warm-up step (s) | compile (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for case, result in timing.items():
            model, _, dtype = case.rpartition(":")
            if "rows" not in result:
                lines.append(f"| {model} | {dtype} | failed: {result.get('error')} | | | | |")
                continue
            model = f"{result['model']} ({result['params'] / 1e6:.0f}M)"
            for name, row in result["rows"].items():
                compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else ""
                lines.append(
                    f"| {model} | {dtype} | {name} | {row['step_s']:.2f} | {row['step_over_floor']:.3f} | {row['warmup_s']:.1f} | {compile_s} |"
                )
        loads = [f"{case}: {', '.join(f'{x:.1f}' for x in r['load_average'])}" for case, r in timing.items() if "load_average" in r]
        if loads:
            lines += ["", "Load average at the end of each timing run: " + "; ".join(loads) + "."]
    agreement = results.get("agreement", {})
    if agreement:
        lines += [
            "",
            f"## Compiled against eager, step by step ({results['settings']['agreement_steps']} steps on SmolLM2)",
            "",
            "At each step both start from the same parameters and optimizer state (the eager trajectory's) and apply the "
            "same gradients. Contract: >= 99.9% of elements bit-identical and at most 1 unit in the last place apart, "
            "at every step. *Units apart*: representable values between the two results; *at the operands' scale*: "
            "the difference in units in the last place at the magnitude of the parameter before the step (or of the "
            "results, if larger), which is what a kernel's rounding error is bounded by. Where an update cancels the "
            "parameter, results one unit apart at that scale can lie thousands of their own units apart (opposite "
            "signs, even): the last two columns count those elements.",
            "",
            "| rule | dtype (write-back) | elements | bit-identical, worst step | per step | most units at the operands' scale "
            "| most units apart | elements > 1 unit apart, worst step | moved per step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for case, row in agreement.items():
            rule, _, dtype = case.partition(":")
            if "steps" not in row:
                lines.append(f"| {rule} | {dtype} | failed: {row.get('error')} | | | | |")
                continue
            per_step = ", ".join(f"{100 * s['identical_share']:.4f}%" for s in row["steps"])
            moved = ", ".join(f"{100 * s['moved_share']:.1f}%" for s in row["steps"])
            lines.append(
                f"| {rule} | {row['dtype']} ({row['rounding']}) | {row['elements']} | {100 * row['min_identical_share']:.4f}% | {per_step} "
                f"| {row['max_units_at_scale']:.3g} | {row['max_units_apart']} | {row['beyond_one_unit']} | {moved} |"
            )
    breakdown = results.get("breakdown", {})
    if breakdown:
        lines += [
            "",
            "## Where the rule's time goes (SmolLM2, compiled fused AdaLomo, alone in the process)",
            "",
            "Per step (ms), medians of the timed steps after a warm-up step: the time in the engine's hooks, in each "
            "compiled kernel (its statistics up to the update, the update and its write-back, the vectors' steps) and "
            "outside them in the hooks (`sum(theta^2)` of each matrix, torch's block sums as in the eager step, and the "
            "Python of 272 updates).",
            "",
            "| dtype | write-back | step | in the hooks | statistics kernel | update kernel | vectors | outside the kernels |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case, row in breakdown.items():
            if "step" not in row:
                lines.append(f"| {case} | failed: {row.get('error')} | | | | | | |")
                continue
            cells = [row[k] * 1e3 for k in ("step", "hooks", "adalomo_prepare_", "adalomo_apply_", "adalomo_vector_step_", "outside_kernels")]
            lines.append(f"| {row['dtype']} | {row['rounding']} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="timing: the dtypes")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="timing: the models")
    parser.add_argument("--cases", nargs="+", default=SETTINGS["agreement_cases"], help="agreement: rule:dtype cases")
    parser.add_argument("--timed-steps", type=int, default=SETTINGS["timed_steps"])
    parser.add_argument("--bf16-runs", nargs="+", default=SETTINGS["timing_runs"]["bfloat16"], help="bf16 rows beside the floor")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="compiled_kernels", help="results file stem under benchmarks/results/")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from precision import quiet

        quiet(args.threads)
        part, name = args.worker
        worker = {"timing": run_timing, "agreement": run_agreement, "breakdown": run_breakdown}[part]
        Path(args.result).write_text(json.dumps(worker(name, json.loads(args.settings), args.device)))
        return

    from precision import environment

    settings = dict(SETTINGS, timed_steps=args.timed_steps, timing_runs=dict(SETTINGS["timing_runs"], bfloat16=args.bf16_runs))
    path = RESULTS / f"{args.out}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("settings") != settings:  # other settings, or an older layout: start afresh
        results = {}
    results.update(settings=settings, environment=dict(environment(), device=args.device, threads=args.threads))
    cases = {
        "timing": [f"{model}:{dtype}" for model in args.models for dtype in args.dtypes],
        "agreement": args.cases,
        "breakdown": settings["breakdown_cases"],
    }
    for part in [p for p in PARTS if p in args.parts]:
        for case in cases[part]:
            results.setdefault(part, {})[case] = run_in_subprocess(part, case, settings, args)
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            (RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
