"""Further pre-training at small scale: validation perplexity of AdamW, AdaLomo and LOMO at equal steps.

A small Llama (see ``quality_common.MODEL``) is pre-trained on the first half of the python_stdlib training
files (AdamW, cached), then pre-trained further on the second half with each method, with a small learning
rate sweep per method. All runs see the same batches in the same order; validation is the held-out stdlib
files. AdaLomo's claim (Lv et al.): on par with AdamW; LOMO (plain SGD) behind.

    python benchmarks/quality_pretrain.py            # ~8 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import math

import quality_common as qc

BASE = dict(subset="first_half", steps=600, lr=3e-3)
LRS = {
    "adamw": [3e-4, 1e-3, 3e-3],
    "adalomo": [0.01, 0.03, 0.1],  # relative to each tensor's RMS, as AdaLomo defines its step
    "lomo": [0.03, 0.1, 0.3],
}
LABELS = {"adamw": "AdamW", "adalomo": "AdaLomo (fused)", "lomo": "LOMO (fused SGD)"}


def run(method: str, lr: float, steps: int, eval_every: int, base: str) -> dict:
    import torch

    qc.quiet()
    dm = qc.stdlib_data(subset="second_half")
    model = qc.build_model()
    model.load_state_dict(torch.load(base))
    trainer = qc.Trainer(model, method, lr=lr, total_steps=steps)
    val = dm.val_dataloader()
    out = qc.train(trainer, qc.forever(dm.train_dataloader), steps, {"val_loss": lambda: qc.evaluate(model, val)}, eval_every)
    out.update(method=method, lr=lr)
    return out


def main() -> None:
    parser = qc.arguments(__doc__, steps=300, workers=2)
    parser.add_argument("--add", nargs="+", metavar="METHOD:LR",
                        help="run only these and merge them into the existing results (e.g. extend a grid at its edge)")
    args = parser.parse_args()

    base = qc.base_checkpoint(**BASE)
    grid = [(m, lr) for m in LRS for lr in LRS[m]]
    if args.add:
        grid = [(item.split(":")[0], float(item.split(":")[1])) for item in args.add]
    jobs = [dict(method=m, lr=lr, steps=args.steps, eval_every=args.eval_every, base=str(base)) for m, lr in grid]
    runs = qc.run_pool(run, jobs, workers=args.workers)
    if args.add:
        previous = json.loads((qc.RESULTS / "quality_pretrain.json").read_text())["runs"]
        added = {(r["method"], r["lr"]) for r in runs}
        runs = [r for r in previous if (r["method"], r["lr"]) not in added] + runs
    runs.sort(key=lambda r: (list(LRS).index(r["method"]), r["lr"]))

    best = {}
    for method in LRS:
        candidates = [r for r in runs if r["method"] == method and math.isfinite(r["curve"][-1]["val_loss"])]
        best[method] = min(candidates, key=lambda r: r["curve"][-1]["val_loss"]) if candidates else None
    ppl = {m: math.exp(r["curve"][-1]["val_loss"]) if r else math.nan for m, r in best.items()}
    start_ppl = math.exp(runs[0]["curve"][0]["val_loss"])
    ratio = ppl["adalomo"] / ppl["adamw"]
    summary = {
        "base": BASE,
        "start_val_ppl": start_ppl,
        "best_lr": {m: (r["lr"] if r else None) for m, r in best.items()},
        "final_val_ppl": ppl,
        "adalomo_over_adamw_ppl": ratio,
        "target_adalomo_within_3pct": bool(ratio <= 1.03),
        "lomo_over_adamw_ppl": ppl["lomo"] / ppl["adamw"],
    }
    qc.RESULTS.mkdir(exist_ok=True)
    (qc.RESULTS / "quality_pretrain.json").write_text(json.dumps(
        {"environment": qc.environment(), "steps": args.steps, "data": "python_stdlib: base on first_half, further pre-training on second_half, val = held-out files",
         "batch": "8 x 128 tokens", "schedule": "linear warm-up 5%, cosine to 10%", "summary": summary, "runs": runs}, indent=2))

    lines = ["| method | lr | final val ppl | val ppl / AdamW best |", "|---|---|---|---|"]
    for r in runs:
        final = math.exp(r["curve"][-1]["val_loss"]) if math.isfinite(r["curve"][-1]["val_loss"]) else math.inf
        mark = " (best)" if best[r["method"]] is r else ""
        lines.append(f"| {LABELS[r['method']]}{mark} | {r['lr']:g} | {final:.3f} | {final / ppl['adamw']:.3f} |")
    text = (f"# Further pre-training, {args.steps} steps (start: val ppl {start_ppl:.3f})\n\n" + "\n".join(lines)
            + f"\n\nAdaLomo / AdamW val ppl: {ratio:.4f} (target <= 1.03: {'PASS' if ratio <= 1.03 else 'FAIL'}); "
            f"LOMO / AdamW: {summary['lomo_over_adamw_ppl']:.4f}\n")
    (qc.RESULTS / "quality_pretrain.md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"adamw": "tab:blue", "adalomo": "tab:orange", "lomo": "tab:green"}
    for r in runs:
        steps = [p["step"] for p in r["curve"]]
        values = [math.exp(min(p["val_loss"], 20)) for p in r["curve"]]
        is_best = best[r["method"]] is r
        ax.plot(steps, values, color=colors[r["method"]], alpha=1.0 if is_best else 0.25, lw=2 if is_best else 1,
                label=f"{LABELS[r['method']]} lr={r['lr']:g}" + (" (best)" if is_best else ""))
    ax.set_ylim(top=start_ppl * 1.1, bottom=min(ppl.values()) * 0.95)
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Further pre-training on python_stdlib (equal steps)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(qc.RESULTS / "quality_pretrain.png", dpi=120)


if __name__ == "__main__":
    main()
