"""SFT (SpIEL-AG, SpIEL-MA) against LoRA at LoRA's trainable budget on the real SmolLM2-135M-Instruct.

    python benchmarks/sft_vs_lora_smollm2.py                  # ~1 hour on 2 quiet CPU cores
    python benchmarks/sft_vs_lora_smollm2.py --part quality --steps 40 --workers 3     # one part, merged into the results

Two measurements, fp32, batch 2 x 128 tokens of ``py_instruct`` through SmolLM2's chat template (prompt
masked out of the loss):

- **step time**: LoRA (peft, rank 8 on q,k,v,o,gate,up,down, AdamW, ordinary backward and step) and SFT
  with exactly as many trainable entries (AG: SFTAdamW, MA: SM3, both fused into backward), built in one
  process and stepped in turns, so that load from other processes hits them alike; medians and ratios.
- **held-out loss** after ``--steps`` steps, for a small LR grid per method (linear warm-up, cosine decay),
  each run in its own process: the mean loss per predicted token on held-out functions.

Peak memory (MemTracker, deterministic) of the same methods: ``memory_speed.py --preset smollm2``.
Writes ``benchmarks/results/sft_vs_lora_smollm2.{json,md,png}``.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import quality_common as qc
from memory_speed import lora_parameter_count

SEQ_LEN, BATCH = 128, 2
LORA_RANK = 8
LRS = {"lora": [1e-4, 3e-4, 1e-3], "sft_ag": [3e-5, 1e-4, 3e-4], "sft_sm3": [1e-4, 3e-4, 1e-3]}
LABELS = {"lora": "LoRA r=8 (peft) + AdamW", "sft_ag": "SFT-AG + SFTAdamW (fused)", "sft_sm3": "SFT-MA + SM3 (fused)"}


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    from lomo_lightning.models import smollm2_directory

    model = AutoModelForCausalLM.from_pretrained(smollm2_directory(), dtype=torch.float32).train()
    model.config.use_cache = False
    return model


def instruct_data(max_val_examples: int):
    from lomo_lightning.data import PyInstructDataModule
    from lomo_lightning.models import smollm2_directory

    dm = PyInstructDataModule(
        tokenizer=smollm2_directory(), seq_len=SEQ_LEN, batch_size=BATCH, max_examples=4000, max_val_examples=max_val_examples
    )
    dm.prepare_data()
    dm.setup()
    return dm


def trainer_for(method: str, lr: float, steps: int) -> qc.Trainer:
    model = load_model()
    return qc.Trainer(model, method, lr=lr, total_steps=steps, sft_budget=lora_parameter_count(model, LORA_RANK), lora_rank=LORA_RANK)


def run(method: str, lr: float, steps: int, max_val_examples: int) -> dict:
    qc.quiet()
    data = instruct_data(max_val_examples)
    trainer = trainer_for(method, lr, steps)
    val = data.val_dataloader()
    out = qc.train(trainer, qc.forever(data.train_dataloader), steps, {"val_loss": lambda: qc.evaluate(trainer.model, val)}, steps)
    out.update(method=method, lr=lr)
    return out


def time_steps(warmup: int, timed: int) -> dict[str, list[float]]:
    """Every method in this process, stepped in turns on the same batches."""
    qc.quiet()
    data = instruct_data(8)
    batches = qc.forever(data.train_dataloader)
    trainers = {method: trainer_for(method, lr=LRS[method][1], steps=100) for method in LRS}
    times: dict[str, list[float]] = {method: [] for method in LRS}
    for i in range(warmup + timed):
        batch = next(batches)
        for method, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(batch)
            if i >= warmup:
                times[method].append(time.perf_counter() - start)
    return times


def measure_timing(args) -> dict:
    print("timing (methods in turns, one process) ...", flush=True)
    times = qc.run_pool(time_steps, [dict(warmup=args.timing_warmup, timed=args.timing_steps)], workers=1)[0]
    medians = {method: statistics.median(values) for method, values in times.items()}
    print({method: round(value, 3) for method, value in medians.items()}, flush=True)
    return {"warmup": args.timing_warmup, "steps_s": times, "median_s": medians,
            "vs_lora": {m: medians[m] / medians["lora"] for m in medians}}


def measure_quality(args) -> dict:
    jobs = [dict(method=m, lr=lr, steps=args.steps, max_val_examples=args.val_examples) for m in LRS for lr in LRS[m]]
    runs = qc.run_pool(run, jobs, workers=args.workers)
    best = {m: min((r for r in runs if r["method"] == m), key=lambda r: r["curve"][-1]["val_loss"]) for m in LRS}
    final = {m: r["curve"][-1]["val_loss"] for m, r in best.items()}
    return {
        "steps": args.steps, "val_examples": args.val_examples, "budget": runs[0]["trainable"], "lrs": LRS,
        "data": f"py_instruct through SmolLM2's chat template, seq {SEQ_LEN}, batch {BATCH}, prompt masked; "
                f"held-out: {args.val_examples} functions from held-out files",
        "schedule": "linear warm-up 5%, cosine to 10%",
        "sft": "reselection every 20 steps after step 5 (the first replaces every entry), initial prune fraction 0.2 (linear decay)",
        "summary": {"best_lr": {m: r["lr"] for m, r in best.items()}, "final_val_loss": final,
                    "start_val_loss": runs[0]["curve"][0]["val_loss"],
                    "sft_at_least_as_good": {m: final[m] <= final["lora"] for m in ("sft_ag", "sft_sm3")}},
        "runs": runs,
    }


def report(results: dict) -> str:
    """The Markdown page of whatever parts ``results`` holds."""
    parts = [f"# SFT vs LoRA on SmolLM2-135M-Instruct, at LoRA's trainable budget (rank {LORA_RANK})\n",
             f"fp32, batch {BATCH} x {SEQ_LEN} of py_instruct through the chat template; a shared 2-core CPU.\n"]
    timing = results.get("timing")
    if timing:
        parts.append(f"## Step time ({len(timing['steps_s']['lora'])} steps after {timing['warmup']} warm-up, methods in turns in one process)\n")
        parts.append("| method | step s (median) | vs LoRA |\n|---|---|---|")
        parts += [f"| {LABELS[m]} | {median:.3f} | {timing['vs_lora'][m]:.3f} |" for m, median in timing["median_s"].items()]
        parts.append("")
    quality = results.get("quality")
    if quality:
        summary = quality["summary"]
        parts.append(f"## Held-out loss after {quality['steps']} steps ({quality['budget']:,} trainable; before training "
                     f"{summary['start_val_loss']:.4f} on {quality['val_examples']} held-out functions)\n")
        parts.append("| method | lr | held-out loss | ppl | wall s (runs in parallel) |\n|---|---|---|---|---|")
        for r in quality["runs"]:
            loss = r["curve"][-1]["val_loss"]
            mark = " (best)" if summary["best_lr"][r["method"]] == r["lr"] else ""
            parts.append(f"| {LABELS[r['method']]}{mark} | {r['lr']:g} | {loss:.4f} | {math.exp(loss):.3f} | {r['seconds']:.0f} |")
        final = summary["final_val_loss"]
        parts.append("\n" + "; ".join(
            f"{LABELS[m]} best {final[m]:.4f} vs LoRA best {final['lora']:.4f}: {'at least as good' if ok else 'worse'}"
            for m, ok in summary["sft_at_least_as_good"].items()) + "\n")
    return "\n".join(parts)


def plot(quality: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"lora": "tab:gray", "sft_ag": "tab:blue", "sft_sm3": "tab:green"}
    for m in LRS:
        rows = sorted((r for r in quality["runs"] if r["method"] == m), key=lambda r: r["lr"])
        ax.plot([r["lr"] for r in rows], [r["curve"][-1]["val_loss"] for r in rows], marker="o", color=colors[m], label=LABELS[m])
    ax.axhline(quality["summary"]["start_val_loss"], color="black", lw=0.8, ls="--", label="before training")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"held-out loss after {quality['steps']} steps")
    ax.set_title(f"SmolLM2-135M-Instruct: SFT vs LoRA at {quality['budget']:,} trainable")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(qc.RESULTS / "sft_vs_lora_smollm2.png", dpi=120)


def main() -> None:
    parser = qc.arguments(__doc__, steps=60, workers=2)
    parser.add_argument("--part", choices=["timing", "quality", "both"], default="both",
                        help="measure one part and merge it into the previous results")
    parser.add_argument("--val-examples", type=int, default=48)
    parser.add_argument("--timing-warmup", type=int, default=2)
    parser.add_argument("--timing-steps", type=int, default=8)
    args = parser.parse_args()

    path = qc.RESULTS / "sft_vs_lora_smollm2.json"
    results = json.loads(path.read_text()) if path.exists() and args.part != "both" else {}
    if args.part in ("timing", "both"):
        results["timing"] = measure_timing(args)
    if args.part in ("quality", "both"):
        results["quality"] = measure_quality(args)
    results["environment"] = dict(qc.environment(), model="SmolLM2-135M-Instruct (fp32)")
    qc.RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    text = report(results)
    (qc.RESULTS / "sft_vs_lora_smollm2.md").write_text(text)
    if "quality" in results:
        plot(results["quality"])
    print(text)


if __name__ == "__main__":
    main()
