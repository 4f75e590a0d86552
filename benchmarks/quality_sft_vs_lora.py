"""Sparse fine-tuning (SpIEL: SFT-AG, SFT-SM3) against LoRA at the same trainable-parameter budget.

The base is the small Llama pre-trained on half of python_stdlib (cached; the same as ``quality_pretrain.py``).
Both fine-tune it on ``py_instruct``: LoRA (peft, rank r on q,k,v,o,gate,up,down) trains its adapters with
AdamW; SFT trains exactly as many entries of the same matrices (``num_tunable_weights``), with SpIEL's rules
(SFTAdamW for AG, SM3 for MA). SpIEL's claim (Ansell et al.): SFT at least as good as LoRA at equal budget.
The same comparison on the real SmolLM2-135M-Instruct: ``sft_vs_lora_smollm2.py``.

    python benchmarks/quality_sft_vs_lora.py         # ~7 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import math

import quality_common as qc
from quality_pretrain import BASE

LORA_RANK = 2
LRS = {"lora": [3e-3, 1e-2, 3e-2], "sft_ag": [3e-3, 1e-2, 3e-2], "sft_sm3": [3e-3, 1e-2, 3e-2]}
LABELS = {"lora": "LoRA (peft) + AdamW", "sft_ag": "SFT-AG (SpIEL) + SFTAdamW", "sft_sm3": "SFT-MA (SpIEL) + SM3"}


def budget() -> tuple[int, float]:
    """LoRA's trainable count and the SFT density with the same count."""
    h, i, layers = qc.MODEL["hidden"], qc.MODEL["intermediate"], qc.MODEL["layers"]
    lora = layers * LORA_RANK * (4 * (h + h) + 2 * (h + i) + (i + h))
    targets = layers * (4 * h * h + 3 * h * i)
    return lora, lora / targets


def run(method: str, lr: float, steps: int, eval_every: int, base: str) -> dict:
    import torch

    qc.quiet()
    instruct = qc.instruct_data()
    model = qc.build_model()
    model.load_state_dict(torch.load(base))
    lora_count, _ = budget()
    trainer = qc.Trainer(model, method, lr=lr, total_steps=steps, sft_budget=lora_count, lora_rank=LORA_RANK)
    val = instruct.val_dataloader()
    out = qc.train(trainer, qc.forever(instruct.train_dataloader), steps,
                   {"instruct_val_loss": lambda: qc.evaluate(trainer.model, val)}, eval_every)
    out.update(method=method, lr=lr)
    return out


def main() -> None:
    parser = qc.arguments(__doc__, steps=150, workers=3)
    args = parser.parse_args()

    base = qc.base_checkpoint(**BASE)
    jobs = [dict(method=m, lr=lr, steps=args.steps, eval_every=args.eval_every, base=str(base)) for m in LRS for lr in LRS[m]]
    runs = qc.run_pool(run, jobs, workers=args.workers)

    lora_count, density = budget()
    best = {m: min((r for r in runs if r["method"] == m), key=lambda r: r["curve"][-1]["instruct_val_loss"]) for m in LRS}
    final = {m: r["curve"][-1]["instruct_val_loss"] for m, r in best.items()}
    start = runs[0]["curve"][0]["instruct_val_loss"]
    lines = ["| method | lr | trainable | instruct val loss | val ppl | wall s (runs in parallel) |", "|---|---|---|---|---|---|"]
    for r in runs:
        loss = r["curve"][-1]["instruct_val_loss"]
        mark = " (best)" if best[r["method"]] is r else ""
        lines.append(f"| {LABELS[r['method']]}{mark} | {r['lr']:g} | {r['trainable']:,} | {loss:.4f} | {math.exp(loss):.3f} | {r['seconds']:.0f} |")
    verdicts = {m: final[m] <= final["lora"] for m in ("sft_ag", "sft_sm3")}
    text = (f"# SFT vs LoRA on py_instruct, {args.steps} steps, budget {lora_count:,} trainable (LoRA rank {LORA_RANK}; "
            f"SFT density {density:.4f}); start val loss {start:.4f}\n\n" + "\n".join(lines)
            + "\n\n" + "; ".join(f"{LABELS[m]} best {final[m]:.4f} vs LoRA best {final['lora']:.4f}: "
                                  f"{'at least as good' if ok else 'worse'}" for m, ok in verdicts.items()) + "\n")
    qc.RESULTS.mkdir(exist_ok=True)
    (qc.RESULTS / "quality_sft_vs_lora.md").write_text(text)
    (qc.RESULTS / "quality_sft_vs_lora.json").write_text(json.dumps(
        {"environment": qc.environment(), "base": BASE, "steps": args.steps, "lora_rank": LORA_RANK,
         "budget": lora_count, "sft_density": density,
         "data": "py_instruct (seq 192, batch 8, prompt masked)", "schedule": "linear warm-up 5%, cosine to 10%",
         "sft": "reselection every 20 steps, AG window 5, initial prune fraction 0.2 (linear decay)",
         "summary": {"best_lr": {m: r["lr"] for m, r in best.items()}, "final_val_loss": final,
                     "sft_at_least_as_good": verdicts}, "runs": runs}, indent=2))
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"lora": "tab:gray", "sft_ag": "tab:blue", "sft_sm3": "tab:green"}
    for r in runs:
        is_best = best[r["method"]] is r
        ax.plot([p["step"] for p in r["curve"]], [p["instruct_val_loss"] for p in r["curve"]], color=colors[r["method"]],
                alpha=1.0 if is_best else 0.3, lw=2 if is_best else 1, label=f"{LABELS[r['method']]} lr={r['lr']:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("py_instruct validation loss")
    ax.set_title(f"SFT vs LoRA at {lora_count:,} trainable parameters")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(qc.RESULTS / "quality_sft_vs_lora.png", dpi=120)


if __name__ == "__main__":
    main()
