"""Forgetting at small scale: full fine-tuning vs Half Fine-Tuning (HFT) in a second stage.

Stage 1: a small Llama is pre-trained on the first half of the python_stdlib training files (AdamW, cached;
the same base as ``quality_pretrain.py``). Stage 2: it is fine-tuned on ``py_instruct`` (function bodies
from signatures and docstrings, prompt masked) with AdaLomo, either on every parameter or with HFT (half of
each block's matrices frozen). Reported: stage-2 quality (instruct validation loss) and what stage 1 left
behind (perplexity on stage-1 training blocks and on the held-out stdlib files), along the way.
HFT's claim (Hui et al.): much less forgetting at equal stage-2 quality.

    python benchmarks/quality_forgetting.py          # ~8 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import math

import quality_common as qc
from quality_pretrain import BASE

LRS = [0.03, 0.1]
LABELS = {"adalomo": "full fine-tuning (AdaLomo)", "hft": "HFT + AdaLomo"}


def run(method: str, lr: float, steps: int, eval_every: int, base: str) -> dict:
    import torch

    qc.quiet()
    instruct = qc.instruct_data()
    stage1 = qc.stdlib_data(subset=BASE["subset"])
    model = qc.build_model()
    model.load_state_dict(torch.load(base))
    trainer = qc.Trainer(model, method, lr=lr, total_steps=steps)
    stage1_blocks = qc.subset_loader(stage1.train_dataset, 8, stage1.collator(), count=32)
    evals = {
        "instruct_val_loss": lambda: qc.evaluate(model, instruct.val_dataloader()),
        "stage1_train_loss": lambda: qc.evaluate(model, stage1_blocks),
        "stdlib_val_loss": lambda: qc.evaluate(model, stage1.val_dataloader()),
    }
    out = qc.train(trainer, qc.forever(instruct.train_dataloader), steps, evals, eval_every)
    out.update(method=method, lr=lr)
    return out


def main() -> None:
    parser = qc.arguments(__doc__, steps=150, workers=2)
    args = parser.parse_args()

    base = qc.base_checkpoint(**BASE)
    jobs = [dict(method=m, lr=lr, steps=args.steps, eval_every=args.eval_every, base=str(base)) for lr in LRS for m in LABELS]
    runs = qc.run_pool(run, jobs, workers=args.workers)

    start = runs[0]["curve"][0]
    lines = [
        "| method | lr | trainable | instruct val loss | stage-1 train ppl (start {:.2f}) | stdlib val ppl (start {:.2f}) "
        "| stage-1 ppl increase |".format(math.exp(start["stage1_train_loss"]), math.exp(start["stdlib_val_loss"])),
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        end = r["curve"][-1]
        lines.append(
            f"| {LABELS[r['method']]} | {r['lr']:g} | {r['trainable'] / 1e6:.2f}M | {end['instruct_val_loss']:.4f} "
            f"| {math.exp(end['stage1_train_loss']):.3f} | {math.exp(end['stdlib_val_loss']):.3f} "
            f"| {math.exp(end['stage1_train_loss'] - start['stage1_train_loss']) - 1:+.1%} |"
        )
    text = (f"# Forgetting: stage 2 on py_instruct, {args.steps} steps (start: instruct val loss "
            f"{start['instruct_val_loss']:.4f})\n\n" + "\n".join(lines) + "\n")
    qc.RESULTS.mkdir(exist_ok=True)
    (qc.RESULTS / "quality_forgetting.md").write_text(text)
    (qc.RESULTS / "quality_forgetting.json").write_text(json.dumps(
        {"environment": qc.environment(), "base": BASE, "steps": args.steps,
         "data": "stage 1: python_stdlib first_half (seq 128); stage 2: py_instruct (seq 192, batch 8, prompt masked)",
         "schedule": "linear warm-up 5%, cosine to 10%", "runs": runs}, indent=2))
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {"adalomo": "tab:red", "hft": "tab:blue"}
    for r in runs:
        style = "-" if r["lr"] == LRS[-1] else "--"
        x = [p["instruct_val_loss"] for p in r["curve"]]
        for ax, key in zip(axes, ("stage1_train_loss", "stdlib_val_loss")):
            ax.plot(x, [math.exp(p[key]) for p in r["curve"]], style, marker="o", ms=3, color=colors[r["method"]],
                    label=f"{LABELS[r['method']]} lr={r['lr']:g}")
    for ax, title in zip(axes, ("stage-1 training blocks", "held-out stdlib files")):
        ax.set_xlabel("stage-2 quality: py_instruct val loss (lower is better)")
        ax.set_ylabel(f"perplexity on {title}")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Forgetting vs stage-2 progress (points every eval; left to right = training)")
    fig.tight_layout()
    fig.savefig(qc.RESULTS / "quality_forgetting.png", dpi=120)


if __name__ == "__main__":
    main()
