"""The papers' claims on SmolLM2-135M-Instruct, over several seeds with 95% intervals, sized for 2 shared CPU cores.

    python benchmarks/claims_smollm2.py pilot --lrs 3e-3 1e-2   # full AdaLomo, seed 0: which learning rate forgets
    python benchmarks/claims_smollm2.py forgetting              # HFT vs full fine-tuning at equal target loss
    python benchmarks/claims_smollm2.py optimizers              # AdaLomo vs AdamW, LOMO beside, over the same runs
    python benchmarks/claims_smollm2.py sft_lora --workers 1    # SFT (SpIEL) vs LoRA at LoRA's budget, along the runs
    python benchmarks/claims_smollm2.py sft_lora --pilot        # its first part only: the learning rates (seed 0)
    python benchmarks/claims_smollm2.py sft_lora --timing       # their step times, stepped in turns in one process

Every run is :func:`training.smollm2_run` (fine-tuning on ``py_instruct`` through the chat template, prompt masked)
with one shared set-up (:data:`SETUP`): short sequences, few steps, an evaluation every few steps of the
held-out response loss and, where a study needs it, the general-ability probes of :mod:`general_ability`
(prose loss, fixed-QA answer loss, greedy answers to factual questions). A seed orders the training
batches and draws HFT's mask; the held-out sets are the same for every seed.

Each finished run is cached under ``benchmarks/runs/claims/`` (git-ignored) by its full configuration, so
the studies share runs (the forgetting study's full-fine-tuning runs are the optimizer study's AdaLomo runs,
a pilot run at the learning rate a study uses is that study's seed 0) and an interrupted command resumes.
Each run also keeps its curve so far beside the cache, so a run stopped early leaves its points
(``--report-only`` reports what finished and lists what stopped).

- ``forgetting`` (Hui et al., HFT): full fine-tuning (AdaLomo) and HFT (the same AdaLomo, half of each block's
  matrices frozen), same learning rate, seeds paired. For each seed, the general-ability change of each method
  where its held-out loss first reaches a target level (linear interpolation between evaluations), at levels
  from the base loss down to the deepest level both methods reach. Claim: HFT's rise <= 0.6x full's.
- ``optimizers`` (Lv et al., AdaLomo): the final held-out loss of AdamW, AdaLomo and LOMO, each at one
  learning rate, seeds paired. Claim: AdaLomo within 2% of AdamW.
- ``sft_lora`` (Ansell et al., SpIEL): LoRA (rank 8) against SFT-AG (a small grid of weight decay on the deltas)
  and SFT-MA at LoRA's exact trainable count, the held-out loss every few steps, seeds paired: the difference
  along the trajectory and where it changes sign. Claim: SFT's held-out loss <= LoRA's.

Writes ``benchmarks/results/claims_<study>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

from harness import env, methods, training

# The shared set-up, sized for a 2-core CPU shared by seven jobs: a step of batch 2 x 128 tokens costs ~7 CPU-s,
# one evaluation with the probes ~45 CPU-s, so a run with the probes is ~3.5 CPU-minutes (10-17 wall minutes at
# the 13-17% of a core each of two processes got here at nice 19)
SETUP: dict[str, Any] = dict(seq_len=128, batch=2, steps=16, eval_every=8, val_examples=24, prose_blocks=1, threads=1)
SEEDS = (0, 1, 2)
# full AdaLomo and HFT: 3x past the top of the former quality_real.py's grid, where 16 steps at <= 3e-3 forgot nothing
FORGET_LR = 3e-3
OPTIMIZER_LRS = {"adamw": 1e-4, "adalomo": FORGET_LR, "lomo": 1e-2}
KEYS = ("prose_loss", "qa_loss", "qa_greedy")
KEY_LABELS = {"prose_loss": "prose loss", "qa_loss": "QA answer loss", "qa_greedy": "greedy answers right"}
LABELS = {"adalomo": "full fine-tuning (AdaLomo)", "hft": "HFT + AdaLomo", "adamw": "AdamW", "lomo": "LOMO"}
LEVELS = (0.25, 0.5, 0.75, 1.0)  # target levels: fractions of the way from the base loss to the deepest common one
CACHE = env.RUNS / "claims"


# Student's t, two-sided 95%, by degrees of freedom (scipy is not a dependency of the benchmarks)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t95(n: int) -> float:
    """The two-sided 95% quantile of Student's t for the mean of ``n`` values (``n - 1`` degrees of freedom)."""
    return T95.get(n - 1, 1.96)


def interval(values: list[float]) -> dict[str, float]:
    """Mean and 95% t-interval of ``values`` (the half-width is NaN for a single value)."""
    mean = statistics.fmean(values)
    half = t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(values)}


def fmt(ci: dict[str, float], digits: int = 4) -> str:
    if math.isnan(ci["low"]):
        return f"{ci['mean']:+.{digits}f} (n=1)"
    return f"{ci['mean']:+.{digits}f} [{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]"


def job(method: str, lr: float, seed: int, general: bool) -> dict[str, Any]:
    return dict(SETUP, method=method, lr=lr, seed=seed, general=general, greedy=general)


def cache_path(config: dict[str, Any]):
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return CACHE / f"{config['method']}-{config['lr']:g}-s{config['seed']}-{key}.json"


def base_point(general: bool) -> dict[str, Any]:
    """The base model's evaluations (step 0 of every run), computed once and cached."""
    config = dict(job("adalomo", 0.0, 0, general), steps=0, eval_every=1)  # no step: learning rate and cadence are moot
    return execute([(config, config)], workers=1)[0]["curve"][0]


def execute(todo: list[tuple[dict[str, Any], dict[str, Any]]], workers: int) -> list[dict[str, Any]]:
    """``training.smollm2_run(**arguments)`` for every ``(config, arguments)`` not cached yet, ``workers`` at a time in
    the given order, each cached under ``config`` as it finishes; then every run, from the cache."""
    CACHE.mkdir(parents=True, exist_ok=True)
    missing = [(c, a) for c, a in todo if not cache_path(c).exists()]
    if missing:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(training.smollm2_run, **a): c for c, a in missing}
            for future in as_completed(futures):
                config, out = futures[future], future.result()
                cache_path(config).write_text(json.dumps(dict(out, config=config)))
                print(f"done {config['method']} lr={config['lr']:g} seed={config['seed']} steps={config['steps']} "
                      f"in {out['seconds']:.0f}s", flush=True)
    return [json.loads(cache_path(c).read_text()) for c, _ in todo]


def run_configs(configs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Every configuration's run, each starting from the base model's cached evaluations."""
    points = {g: base_point(g) for g in sorted({c["general"] for c in configs})}
    return execute([(c, dict(c, initial=points[c["general"]], progress=str(partial_path(c)))) for c in configs], workers)


def finished_or_run(configs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration's run; with ``--report-only`` only the finished ones, from the cache."""
    if args.report_only:
        return execute([(c, c) for c in configs if cache_path(c).exists()], args.workers)
    return run_configs(configs, args.workers)


def partial_path(config: dict[str, Any]):
    """Where a run keeps its curve so far (what is left of it if it is stopped before the end)."""
    return cache_path(config).with_suffix(".partial.json")


# ------------------------------------------------------------------------------------------------- forgetting


def change(run: dict[str, Any], key: str) -> float:
    """The change of ``key`` from the base model to the end of ``run``."""
    return run["curve"][-1]["general"][key] - run["curve"][0]["general"][key]


def deepest_common(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The lowest held-out loss both runs reach (each run's minimum along its curve; the higher of the two)."""
    return max(min(p["instruct_val_loss"] for p in r["curve"]) for r in (a, b))


def forgetting_by_seed(full: list[dict], hft: list[dict]) -> list[dict[str, Any]]:
    """Per seed: the target levels, and each method's general-ability change at each (``None``: not reached)."""
    out = []
    for f, h in zip(full, hft):
        base = f["curve"][0]["instruct_val_loss"]
        deepest = deepest_common(f, h)
        levels = [base - x * (base - deepest) for x in LEVELS]
        out.append({
            "seed": f["seed"], "base_loss": base, "levels": levels, "progress": deepest < base,
            "full": [training.forgetting_at(f, t, KEYS) for t in levels],
            "hft": [training.forgetting_at(h, t, KEYS) for t in levels],
        })
    return out


def forgetting_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """At each level (fraction of the way to the deepest common loss): both methods' changes, their difference, ratio.

    Seeds where one method never gets below the base loss have no such level and are left out ({} if all are).
    """
    summary: dict[str, Any] = {}
    per_seed = [s for s in per_seed if s.get("progress", True)]  # seeds with a common level below the base loss
    if not per_seed:
        return summary
    for i, level in enumerate(LEVELS):
        row: dict[str, Any] = {}
        for key in KEYS:
            full = [s["full"][i][key] for s in per_seed]
            hft = [s["hft"][i][key] for s in per_seed]
            mean_full = statistics.fmean(full)
            row[key] = {
                "full": interval(full), "hft": interval(hft),
                "hft_minus_full": interval([h - f for h, f in zip(hft, full)]),
                # the claim's measure: HFT's change over full's, of the means over seeds (undefined without forgetting)
                "ratio_of_means": statistics.fmean(hft) / mean_full if mean_full != 0 else math.nan,
                "ratio_by_seed": [h / f if f != 0 else math.nan for h, f in zip(hft, full)],
            }
        summary[str(level)] = row
    return summary


def forgot(key: str, mean_change: float) -> bool:
    """Whether a mean change of probe ``key`` is forgetting: a loss that rose, a greedy score that fell.

    Changes within float rounding of 0 (a greedy score back where it started) are not forgetting.
    """
    return mean_change < -1e-9 if key == "qa_greedy" else mean_change > 1e-9


def forgetting_report(runs: dict[str, list[dict]], per_seed: list[dict], summary: dict[str, Any]) -> str:
    full = runs["adalomo"]
    base = full[0]["curve"][0]
    lines = [
        f"# Forgetting at equal target loss: HFT vs full fine-tuning, SmolLM2-135M-Instruct ({len(per_seed)} seeds)",
        "",
        f"py_instruct through the chat template, batch {SETUP['batch']} x <= {SETUP['seq_len']} tokens, "
        f"{SETUP['steps']} steps, AdaLomo lr {full[0]['lr']:g} for both (HFT: half of each block's matrices frozen, "
        f"mask drawn by the seed), linear warm-up 5% then cosine to 10%; held-out response loss on "
        f"{SETUP['val_examples']} held-out functions every {SETUP['eval_every']} steps, with the general-ability probes.",
        "",
        f"Base model: held-out loss {base['instruct_val_loss']:.4f}, prose loss {base['general']['prose_loss']:.4f}, "
        f"QA answer loss {base['general']['qa_loss']:.4f}, greedy answers right {base['general']['qa_greedy']:.3f}.",
        "",
        "## Every run at its end",
        "",
        "| method | seed | held-out loss (lowest) | prose loss change | QA loss change | greedy right change | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("adalomo", "hft"):
        for r in runs[method]:
            end = r["curve"][-1]
            lowest = min(p["instruct_val_loss"] for p in r["curve"])
            lines.append(
                f"| {LABELS[method]} | {r['seed']} | {end['instruct_val_loss']:.4f} ({lowest:.4f}) | "
                + " | ".join(f"{change(r, k):+.4f}" for k in KEYS) + f" | {r['seconds']:.0f} |"
            )
    lines += [
        "",
        f"## At equal steps (the end, step {SETUP['steps']}; mean over seeds, 95% t-interval; HFT - full paired by seed)",
        "",
        "| measure | full fine-tuning | HFT | HFT - full |",
        "|---|---|---|---|",
    ]
    ends = {m: [r["curve"][-1]["instruct_val_loss"] - r["curve"][0]["instruct_val_loss"] for r in runs[m]] for m in runs}
    lines.append(f"| held-out loss change | {fmt(interval(ends['adalomo']))} | {fmt(interval(ends['hft']))} | "
                 f"{fmt(interval([h - f for h, f in zip(ends['hft'], ends['adalomo'])]))} |")
    for key in KEYS:
        full_c, hft_c = [change(r, key) for r in runs["adalomo"]], [change(r, key) for r in runs["hft"]]
        lines.append(f"| {KEY_LABELS[key]} change | {fmt(interval(full_c))} | {fmt(interval(hft_c))} | "
                     f"{fmt(interval([h - f for h, f in zip(hft_c, full_c)]))} |")
    empty = [s["seed"] for s in per_seed if not s["progress"]]
    lines += [
        "",
        "## At equal held-out loss (mean over seeds, 95% t-interval)",
        "",
        "Levels are fractions of the way from the base loss to the deepest loss both methods of a seed reach "
        "(per seed: " + ", ".join(f"{s['levels'][-1]:.4f}" for s in per_seed) + "). A rise of a loss, or a fall "
        "of the greedy score, is forgetting.",
        "",
    ]
    if empty:
        lines += [f"Left out: seed(s) {', '.join(map(str, empty))}, where one method never got below the base "
                  "model's held-out loss (no common level below it).", ""]
    lines += [
        "| level | probe | full fine-tuning | HFT | HFT - full | HFT / full (means) |",
        "|---|---|---|---|---|---|",
    ]
    for level, row in summary.items():
        for key in KEYS:
            cell = row[key]
            # a ratio only where full fine-tuning forgot: over a change near zero or an improvement it means nothing
            ratio = f"{cell['ratio_of_means']:.2f}" if forgot(key, cell["full"]["mean"]) else "- (full did not forget)"
            lines.append(
                f"| {float(level):.2f} | {KEY_LABELS[key]} | {fmt(cell['full'])} | {fmt(cell['hft'])} | "
                f"{fmt(cell['hft_minus_full'])} | {ratio} |"
            )
    lines += ["", "## The claim (HFT's increase <= 0.6x full fine-tuning's, at the deepest common loss)", ""]
    if not summary:
        lines.append("Not measurable here: in no seed did both methods get below the base model's held-out loss, so "
                     "there is no level of equal target loss to compare at (see the table at equal steps).")
        return "\n".join(lines) + "\n"
    end = summary[str(LEVELS[-1])]
    for key in KEYS:
        cell = end[key]
        if not forgot(key, cell["full"]["mean"]):
            verdict = "full fine-tuning did not forget on this probe here, so the ratio says nothing"
        elif not forgot(key, cell["hft"]["mean"]):
            verdict = "HFT did not forget at all (its change is an improvement): meets the 0.6x target"
        else:
            ok = cell["ratio_of_means"] <= 0.6
            verdict = f"{cell['ratio_of_means']:.2f}x: {'meets' if ok else 'misses'} the 0.6x target"
        diff = cell["hft_minus_full"]
        sure = not math.isnan(diff["low"]) and (diff["high"] < 0 or diff["low"] > 0)
        lines.append(f"- {KEY_LABELS[key]}: full {fmt(cell['full'])}, HFT {fmt(cell['hft'])}; {verdict} "
                     f"(per seed: {', '.join(f'{x:.2f}' for x in cell['ratio_by_seed'])}); HFT - full {fmt(diff)}: "
                     + ("its 95% interval excludes 0" if sure else "its 95% interval includes 0, so the seeds do not "
                        "establish a difference"))
    return "\n".join(lines) + "\n"


def forgetting_plot(runs: dict[str, list[dict]], name: str) -> None:
    fig, axes = env.figure(1, 3, figsize=(16, 4.5))
    colors = {"adalomo": "tab:red", "hft": "tab:blue"}
    for method in ("adalomo", "hft"):
        for i, r in enumerate(runs[method]):
            x = [p["instruct_val_loss"] for p in r["curve"]]
            for ax, key in zip(axes, KEYS):
                ax.plot(x, [p["general"][key] for p in r["curve"]], marker="o", ms=3, color=colors[method],
                        alpha=0.8, label=LABELS[method] if i == 0 else None)
    for ax, key in zip(axes, KEYS):
        worse = "lower" if key == "qa_greedy" else "higher"
        ax.set(xlabel="held-out response loss (lower: better fine-tuned)", ylabel=f"{KEY_LABELS[key]} ({worse}: forgot)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct on py_instruct: what each method forgets on the way (one line per seed)")
    env.save(fig, name)


def unfinished(configs: list[dict[str, Any]]) -> str:
    """A note on the runs of ``configs`` that did not finish: the last point each left (or that it left none)."""
    lines = []
    for c in configs:
        if cache_path(c).exists():
            continue
        partial = partial_path(c)
        if not partial.exists():
            lines.append(f"- {LABELS[c['method']]}, seed {c['seed']}: not run (or stopped before its first evaluation)")
            continue
        curve = json.loads(partial.read_text())["curve"]
        last, base = curve[-1], curve[0]
        lines.append(f"- {LABELS[c['method']]}, seed {c['seed']}: stopped after step {last['step']} of {c['steps']}; there: "
                     f"held-out loss {last['instruct_val_loss']:.4f}, "
                     + ", ".join(f"{KEY_LABELS[k]} change {last['general'][k] - base['general'][k]:+.4f}" for k in KEYS))
    return ("\n## Runs that did not finish (left out above)\n\n" + "\n".join(lines) + "\n") if lines else ""


def forgetting(args: argparse.Namespace) -> None:
    configs = [job(m, args.lr, seed, True) for seed in args.seeds for m in ("adalomo", "hft")]
    if args.report_only:  # the seeds whose two runs both finished; the others are listed as unfinished
        seeds = [s for s in args.seeds if all(cache_path(job(m, args.lr, s, True)).exists() for m in ("adalomo", "hft"))]
        results = execute([(c, c) for c in configs if c["seed"] in seeds], args.workers)
    else:
        seeds = args.seeds
        results = run_configs(configs, args.workers)
    runs = {m: [r for r in results if r["method"] == m] for m in ("adalomo", "hft")}
    per_seed = forgetting_by_seed(runs["adalomo"], runs["hft"])
    summary = forgetting_summary(per_seed)
    text = forgetting_report(runs, per_seed, summary) + unfinished(configs)
    write("claims_forgetting", text, {"setup": SETUP, "lr": args.lr, "seeds": seeds, "levels": LEVELS,
                                      "per_seed": per_seed, "summary": summary, "runs": results})
    forgetting_plot(runs, "claims_forgetting")


# ------------------------------------------------------------------------------------------------- optimizers


def optimizers_report(runs: dict[str, list[dict]], lrs: dict[str, float]) -> tuple[str, dict[str, Any]]:
    final = {m: [r["curve"][-1]["instruct_val_loss"] for r in rs] for m, rs in runs.items()}
    base = next(iter(runs.values()))[0]["curve"][0]["instruct_val_loss"]
    lines = [
        f"# AdaLomo vs AdamW (LOMO beside) on SmolLM2-135M-Instruct, {SETUP['steps']} steps, "
        f"{len(final['adamw'])} seeds",
        "",
        f"py_instruct through the chat template, batch {SETUP['batch']} x <= {SETUP['seq_len']} tokens, linear "
        f"warm-up 5% then cosine to 10%, the same batches for every method of a seed; held-out response loss on "
        f"{SETUP['val_examples']} held-out functions (base model {base:.4f}).",
        "",
        "| method | lr | final held-out loss per seed | mean [95% interval] | / AdamW (paired, mean [95%]) |",
        "|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {"lrs": lrs, "final": final}
    for m, losses in final.items():
        ratio = interval([x / a for x, a in zip(losses, final["adamw"])])
        summary[f"{m}_over_adamw"] = ratio
        ci = interval(losses)
        lines.append(f"| {LABELS[m]} | {lrs[m]:g} | {', '.join(f'{x:.4f}' for x in losses)} | "
                     f"{ci['mean']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] | "
                     f"{ratio['mean']:.4f} [{ratio['low']:.4f}, {ratio['high']:.4f}] |")
    ratio = summary["adalomo_over_adamw"]
    within = ratio["mean"] <= 1.02 and (math.isnan(ratio["high"]) or ratio["high"] <= 1.02)
    lines += ["", f"- AdaLomo / AdamW: {ratio['mean']:.4f}x (95% interval {ratio['low']:.4f}-{ratio['high']:.4f}); "
              f"target <= 1.02x: {'met (whole interval)' if within else 'met by the mean only' if ratio['mean'] <= 1.02 else 'missed'}"]
    return "\n".join(lines) + "\n", summary


def optimizers_plot(runs: dict[str, list[dict]], name: str) -> None:
    fig, ax = env.figure(figsize=(7, 4.5))
    colors = {"adamw": "black", "adalomo": "tab:red", "lomo": "tab:orange"}
    for m, rs in runs.items():
        for i, r in enumerate(rs):
            ax.plot([p["step"] for p in r["curve"]], [p["instruct_val_loss"] for p in r["curve"]], marker="o", ms=3,
                    color=colors[m], alpha=0.8, label=f"{LABELS[m]} lr={r['lr']:g}" if i == 0 else None)
    ax.set(xlabel="step", ylabel="held-out response loss (py_instruct)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M-Instruct: AdaLomo vs AdamW, LOMO (one line per seed)")
    env.save(fig, name)


def optimizers(args: argparse.Namespace) -> None:
    lrs = dict(OPTIMIZER_LRS, **dict(parse_lr(x) for x in args.lr_of))
    # AdaLomo's runs are the forgetting study's full fine-tuning (with the probes); the others need only the loss
    configs = [job(m, lrs[m], seed, m == "adalomo") for seed in args.seeds for m in ("adalomo", "adamw", "lomo")]
    if args.run_only:  # run these methods' runs only (e.g. while another command runs the rest); no report
        run_configs([c for c in configs if c["method"] in args.run_only], args.workers)
        return
    results = run_configs(configs, args.workers)
    runs = {m: [r for r in results if r["method"] == m] for m in ("adamw", "adalomo", "lomo")}
    text, summary = optimizers_report(runs, lrs)
    write("claims_optimizers", text, {"setup": SETUP, "seeds": args.seeds, "summary": summary, "runs": results})
    optimizers_plot(runs, "claims_optimizers")


# ------------------------------------------------------------------------------------------------- pilot


def pilot(args: argparse.Namespace) -> None:
    configs = [job(m, lr, 0, True) for lr in args.lrs for m in args.methods]
    if args.report_only:  # finished runs from the cache, stopped ones from the curve they left
        results = []
        for c in configs:
            path = cache_path(c) if cache_path(c).exists() else partial_path(c)
            if path.exists():
                results.append(dict(json.loads(path.read_text()), method=c["method"], lr=c["lr"]))
    else:
        results = run_configs(configs, args.workers)
    base = results[0]["curve"][0]
    lines = [
        "# Pilot: which learning rate makes fine-tuning forget within the budget (seed 0)",
        "",
        f"Set-up as in `claims_forgetting.md` ({SETUP['steps']} steps, batch {SETUP['batch']} x <= {SETUP['seq_len']}). "
        f"Base: held-out loss {base['instruct_val_loss']:.4f}, " + ", ".join(f"{KEY_LABELS[k]} {base['general'][k]:.4f}" for k in KEYS) + ".",
        "",
        "| method | lr | step | held-out loss | " + " | ".join(f"{KEY_LABELS[k]} change" for k in KEYS) + " |",
        "|---|---|---|---|" + "---|" * len(KEYS),
    ]
    for r in results:
        for p in r["curve"][1:]:
            lines.append(f"| {LABELS[r['method']]} | {r['lr']:g} | {p['step']} of {SETUP['steps']} | {p['instruct_val_loss']:.4f} | "
                         + " | ".join(f"{p['general'][k] - base['general'][k]:+.4f}" for k in KEYS) + " |")
    write("claims_pilot", "\n".join(lines) + "\n", {"setup": SETUP, "runs": results})


# ------------------------------------------------------------------------------------------------- SFT vs LoRA

# longer runs than SETUP's, a held-out evaluation every few steps (no probes); SFT reselects after steps 5 and 25
SFT_LORA = dict(steps=30, eval_every=5)
SFT_LORA_PILOT = {"lora": (1e-3, 3e-3, 1e-2), "sft_ag": (3e-4, 1e-3), "sft_ma": (1e-3, 3e-3)}  # seed 0, no decay
# SFT-AG's weight decay on the deltas (toward the base). The paper searched 1-30 at lr 1e-5 over thousands of steps;
# what the deltas feel is the total shrink, sum(lr_t * decay): for 30 over these 30 steps about 0.5 at lr 1e-3 and
# 0.15 at 3e-4 (the paper's: ~5e3 steps x 3e-4 x ~0.5), while 3 would shrink them by 1.5-5% only
SFT_DECAYS = (0.0, 30.0)
ARM_LABELS = {"lora": "LoRA r=8 + AdamW (peft)", "sft_ag": "SFT-AG + SFTAdamW", "sft_ma": "SFT-MA + SM3"}


def sft_job(method: str, lr: float, seed: int, weight_decay: float = 0.0) -> dict[str, Any]:
    return dict(job(method, lr, seed, False), **SFT_LORA, weight_decay=weight_decay)


def arm_label(method: str, weight_decay: float) -> str:
    return ARM_LABELS[method] + (f", decay {weight_decay:g}" if method == "sft_ag" else "")


def losses(run: dict[str, Any]) -> list[float]:
    return [p["instruct_val_loss"] for p in run["curve"]]


def sft_lora_pilot(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seed 0 of every method at every pilot learning rate, no decay (run, or from the cache); writes its page."""
    configs = [sft_job(m, lr, 0) for m, lrs in SFT_LORA_PILOT.items() for lr in lrs]
    results = finished_or_run(configs, args)
    steps = [p["step"] for p in results[0]["curve"]]
    lines = [f"# Pilot: learning rates for SFT vs LoRA (seed 0, no weight decay, {SFT_LORA['steps']} steps)", "",
             "Held-out response loss along the run; set-up as in `claims_sft_lora.md`, which takes each method's "
             "learning rate with the lowest final loss here.", "",
             "| method | lr | " + " | ".join(f"step {s}" for s in steps) + " | s |", "|---|---|" + "---|" * (len(steps) + 1)]
    for r in results:
        lines.append(f"| {ARM_LABELS[r['method']]} | {r['lr']:g} | " + " | ".join(f"{x:.4f}" for x in losses(r))
                     + f" | {r['seconds']:.0f} |")
    write("claims_sft_lora_pilot", "\n".join(lines) + "\n", {"setup": dict(SETUP, **SFT_LORA), "runs": results})
    return results


def time_steps(warmup: int, timed: int) -> dict[str, list[float]]:
    """LoRA, SFT-AG and SFT-MA built in this one process and stepped in turns on the same batches (load hits all)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_lightning.models import smollm2_directory

    env.quiet()
    directory = smollm2_directory()
    data = training.smollm2_instruct_data(AutoTokenizer.from_pretrained(directory), 8, SETUP["seq_len"], SETUP["batch"])
    batches, trainers = training.forever(data.train_dataloader), {}
    for m in ARM_LABELS:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
        trainers[m] = training.Trainer(model, {"sft_ma": "sft_sm3"}.get(m, m), lr=1e-3, total_steps=100,
                                 lora_rank=training.SMOLLM2_LORA_RANK,
                                       sft_budget=methods.lora_parameter_count(model, training.SMOLLM2_LORA_RANK))
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for i in range(warmup + timed):
        batch = next(batches)
        for m, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(batch)
            if i >= warmup:
                times[m].append(time.perf_counter() - start)
    return times


def sft_lora_timing() -> None:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:  # a fresh process of its own
        times = pool.submit(time_steps, warmup=2, timed=8).result()
    medians = {m: statistics.median(v) for m, v in times.items()}
    lines = [f"# Step time, SFT vs LoRA at LoRA's budget, SmolLM2-135M-Instruct (batch {SETUP['batch']} x {SETUP['seq_len']})", "",
             "The three built in one process and stepped in turns on the same batches, 8 steps after 2 warm-up, one "
             "torch thread; a shared 2-core CPU.", "", "| method | step s (median) | vs LoRA |", "|---|---|---|"]
    lines += [f"| {ARM_LABELS[m]} | {v:.3f} | {v / medians['lora']:.3f} |" for m, v in medians.items()]
    write("claims_sft_lora_timing", "\n".join(lines) + "\n", {"steps_s": times, "median_s": medians})


def sft_lora(args: argparse.Namespace) -> None:
    if args.timing:
        return sft_lora_timing()
    pilot_runs = sft_lora_pilot(args)  # the pilot first (cached runs cost nothing): it picks the learning rates
    if args.pilot:
        return
    best = {m: min((r for r in pilot_runs if r["method"] == m), key=lambda r: losses(r)[-1])["lr"] for m in SFT_LORA_PILOT}
    lrs = dict(best, **dict(parse_lr(x) for x in args.lr_of))
    arms = [("lora", 0.0)] + [("sft_ag", wd) for wd in SFT_DECAYS] + [("sft_ma", 0.0)]
    configs = [sft_job(m, lrs[m], seed, wd) for seed in args.seeds for m, wd in arms]  # seed by seed: a stop leaves whole seeds
    results = finished_or_run(configs, args)
    runs = {arm: [r for r in results if (r["config"]["method"], r["config"]["weight_decay"]) == arm] for arm in arms}
    seeds = [r["seed"] for r in runs[("lora", 0.0)]]
    runs = {arm: rs for arm, rs in runs.items() if [r["seed"] for r in rs] == seeds}  # arms with every seed LoRA has
    steps = [p["step"] for p in runs[("lora", 0.0)][0]["curve"]]
    lora = [losses(r) for r in runs[("lora", 0.0)]]
    summary: dict[str, Any] = {}
    lines = [
        f"# SFT (SpIEL) against LoRA at LoRA's budget, SmolLM2-135M-Instruct, {len(seeds)} seeds",
        "",
        f"py_instruct through the chat template, batch {SETUP['batch']} x <= {SETUP['seq_len']} tokens, {SFT_LORA['steps']} "
        f"steps, linear warm-up 5% then cosine to 10%; held-out response loss on {SETUP['val_examples']} held-out "
        f"functions every {SFT_LORA['eval_every']} steps (base model {lora[0][0]:.4f}). LoRA: rank 8, alpha 16 on "
        f"q,k,v,o,gate,up,down, AdamW; SFT: exactly LoRA's trainable count ({runs[('lora', 0.0)][0]['trainable']:,}) on "
        "the same matrices, reselection every 20 steps after step 5 (the first replaces every entry), SFT-AG with "
        "SFTAdamW (eps 1e-6, the reference's), SFT-MA with SM3; weight decay on the deltas pulls them toward the base. "
        "A seed orders the batches and draws SFT's initial entries; each method's learning rate is its best in the "
        "pilot (seed 0, no decay: `claims_sft_lora_pilot.md`), whose runs are also seed 0 here.",
        "",
        f"## At the end (step {steps[-1]}; mean over seeds, 95% t-interval; ratios paired by seed)",
        "",
        "| method | lr | final held-out loss per seed | mean [95%] | / LoRA [95%] | SFT - LoRA [95%] |",
        "|---|---|---|---|---|---|",
    ]
    for (m, wd), rs in runs.items():
        final = [losses(r)[-1] for r in rs]
        ratio = interval([x / y[-1] for x, y in zip(final, lora)])
        diff = interval([x - y[-1] for x, y in zip(final, lora)])
        ci = interval(final)
        summary[f"{m}:{wd:g}"] = {"lr": lrs[m], "weight_decay": wd, "final": final, "final_ci": ci, "over_lora": ratio,
                                   "minus_lora_by_step": [interval([a - b for a, b in zip(x, y)]) for x, y in
                                                          zip(zip(*[losses(r) for r in rs]), zip(*lora))]}
        lines.append(f"| {arm_label(m, wd)} | {lrs[m]:g} | {', '.join(f'{x:.4f}' for x in final)} | "
                     f"{ci['mean']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] | "
                     + ("- | - |" if m == "lora" else f"{ratio['mean']:.4f} [{ratio['low']:.4f}, {ratio['high']:.4f}] | {fmt(diff)} |"))
    lines += ["", "## Along the trajectory: SFT - LoRA held-out loss (mean over seeds [95%]; negative: SFT better)", "",
              "| step | LoRA (mean) | " + " | ".join(arm_label(m, wd) for m, wd in runs if m != "lora") + " |",
              "|---|---|" + "---|" * (len(runs) - 1)]
    for i, step in enumerate(steps):
        lines.append(f"| {step} | {statistics.fmean(x[i] for x in lora):.4f} | " + " | ".join(
            fmt(summary[f"{m}:{wd:g}"]["minus_lora_by_step"][i]) for m, wd in runs if m != "lora") + " |")
    lines += ["", "## The claim (SFT's held-out loss <= LoRA's at equal budget)", ""]
    for (m, wd) in runs:
        if m == "lora":
            continue
        cell = summary[f"{m}:{wd:g}"]
        by_step = cell["minus_lora_by_step"][1:]
        below = [s for s, d in zip(steps[1:], by_step) if d["mean"] <= 0]
        sure_worse = [s for s, d in zip(steps[1:], by_step) if d["low"] > 0]
        sure_better = [s for s, d in zip(steps[1:], by_step) if d["high"] < 0]
        crossings = [steps[1:][i + 1] for i in range(len(by_step) - 1)
                     if (by_step[i]["mean"] <= 0) != (by_step[i + 1]["mean"] <= 0)]
        ratio = cell["over_lora"]
        lines.append(
            f"- {arm_label(m, wd)}: {ratio['mean']:.4f}x LoRA's final loss [{ratio['low']:.4f}, {ratio['high']:.4f}]; "
            f"at or below LoRA (mean) at steps {below or 'none'}; above it with the interval excluding 0 at steps "
            f"{sure_worse or 'none'}, below it so at {sure_better or 'none'}; "
            + (f"the mean difference changes sign by step(s) {crossings}" if crossings else "no crossover in the mean"))
    lines.append("\nThe best of several decays, picked over the same seeds, is an optimistic estimate of SFT-AG.")
    write("claims_sft_lora", "\n".join(lines) + "\n",
          {"setup": dict(SETUP, **SFT_LORA), "lrs": lrs, "decays": SFT_DECAYS, "seeds": seeds, "steps": steps,
           "summary": summary, "runs": results})
    sft_lora_plot(runs, steps)


def sft_lora_plot(runs: dict[tuple[str, float], list[dict]], steps: list[int]) -> None:
    fig, axes = env.figure(1, 2, figsize=(13, 4.5))
    colors = iter(("black", "tab:blue", "tab:cyan", "tab:purple", "tab:green"))
    lora = [losses(r) for r in runs[("lora", 0.0)]]
    for (m, wd), rs in runs.items():
        color, label = next(colors), arm_label(m, wd)
        mean = [statistics.fmean(x) for x in zip(*[losses(r) for r in rs])]
        axes[0].plot(steps, mean, marker="o", ms=3, color=color, label=label)
        for r in rs:
            axes[0].plot(steps, losses(r), color=color, alpha=0.25, lw=0.8)
        if m != "lora":
            cis = [interval([a - b for a, b in zip(x, y)]) for x, y in zip(zip(*[losses(r) for r in rs]), zip(*lora))]
            axes[1].plot(steps, [c["mean"] for c in cis], marker="o", ms=3, color=color, label=label)
            axes[1].fill_between(steps, [c["low"] for c in cis], [c["high"] for c in cis], color=color, alpha=0.15)
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[0].set(xlabel="step", ylabel="held-out response loss (py_instruct)", title="mean over seeds (thin: each seed)")
    axes[1].set(xlabel="step", ylabel="SFT - LoRA held-out loss", title="paired by seed, 95% t-interval (below 0: SFT better)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: SFT (SpIEL) vs LoRA at LoRA's trainable budget")
    env.save(fig, "claims_sft_lora")


# ------------------------------------------------------------------------------------------------- main


def parse_lr(text: str) -> tuple[str, float]:
    method, _, value = text.partition("=")
    return method, float(value)


def write(name: str, text: str, payload: dict[str, Any]) -> None:
    env.write(name, dict(payload, environment=env.environment(model="SmolLM2-135M-Instruct")), text)
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["pilot", "forgetting", "optimizers", "sft_lora"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=FORGET_LR, help="forgetting: the learning rate of both methods")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2], help="pilot: the learning rates tried")
    parser.add_argument("--methods", nargs="+", default=["adalomo"], help="pilot: the methods tried")
    parser.add_argument("--lr-of", nargs="*", default=[], metavar="METHOD=LR",
                        help="optimizers, sft_lora: override a learning rate")
    parser.add_argument("--report-only", action="store_true",
                        help="forgetting, pilot, sft_lora: run nothing; report what finished (and what stopped runs left)")
    parser.add_argument("--pilot", action="store_true", help="sft_lora: the learning-rate pilot (seed 0) instead")
    parser.add_argument("--timing", action="store_true", help="sft_lora: step times (the three in turns) instead")
    parser.add_argument("--run-only", nargs="*", default=[], metavar="METHOD", help="optimizers: only run these, no report")
    args = parser.parse_args()
    {"pilot": pilot, "forgetting": forgetting, "optimizers": optimizers, "sft_lora": sft_lora}[args.study](args)


if __name__ == "__main__":
    main()
