"""Instruction tuning and forgetting on a real pretrained model: SmolLM2-135M-Instruct, every method side by side.

The model is fine-tuned on ``py_instruct`` (complete a stdlib function from its signature and docstring),
prompts through its own chat template, loss on the response only. Every method sees the same batches in the
same order, for the same number of steps, with a small learning-rate grid each (the best is reported):

- full fine-tuning: AdamW (standard), AdaLomo and LOMO (fused into backward);
- HFT + AdaLomo (half of each block's matrices frozen);
- LoRA (peft, rank r on every linear layer of the blocks) and SFT-AG / SFT-MA (SpIEL) at LoRA's trainable budget.

Measured along training: the held-out response loss (``py_instruct`` validation examples) and the model's general
ability (:mod:`general_ability`: English prose loss, fixed-QA answer loss), so forgetting can be compared at equal
target loss. The claims checked: AdaLomo within 2% of AdamW's held-out loss (Lv et al.); HFT forgets at most 0.6x
of what full fine-tuning forgets at equal target loss (Hui et al.); SFT's held-out loss at most LoRA's (Ansell et al.).

    python benchmarks/quality_real.py                       # all methods, every grid, 100 steps: ~15 h on this CPU
    python benchmarks/quality_real.py --methods adalomo lora --steps 20    # a subset, merged into the results
    python benchmarks/quality_real.py --one-lr --steps 16 --eval-every 8 --val-examples 32 --threads 1   # a short look
    python benchmarks/quality_real.py --grid-index 1 --steps 16 --eval-every 8 --val-examples 32 --threads 1   # its second LRs

``--one-lr`` runs each method at the first learning rate of its grid only (no tuning: a claim about tuned
learning rates then does not follow).
"""

from __future__ import annotations

import json
from typing import Any

import quality_common as qc

LORA_RANK = 8
LRS = {  # the first of each grid is the guess --one-lr runs; later points extend it past the better edge of the earlier ones
    "adamw": [3e-5, 1e-5, 1e-4, 3e-4],
    "adalomo": [3e-4, 1e-3],
    "lomo": [3e-3, 1e-2, 3e-2],
    "hft": [3e-4, 1e-3, 3e-3],
    "lora": [1e-3, 3e-4, 3e-3],
    "sft_ag": [3e-4, 1e-4, 1e-3],
    "sft_ma": [3e-4, 1e-4, 1e-3],
}
LABELS = {
    "adamw": "AdamW (standard)",
    "adalomo": "AdaLomo (fused)",
    "lomo": "LOMO (fused)",
    "hft": "HFT + AdaLomo (fused)",
    "lora": f"LoRA r={LORA_RANK} + AdamW (peft)",
    "sft_ag": "SFT-AG (SpIEL) + SFTAdamW (fused)",
    "sft_ma": "SFT-MA (SpIEL) + SM3 (fused)",
}
SEQ_LEN, BATCH, VAL_EXAMPLES = 256, 4, 64
NAME = "quality_real"


def instruct_data(tokenizer, val_examples: int = VAL_EXAMPLES, seq_len: int = SEQ_LEN, batch: int = BATCH) -> Any:
    from lomo_lightning.data import PyInstructDataModule

    dm = PyInstructDataModule(tokenizer, seq_len=seq_len, batch_size=batch, max_val_examples=val_examples)
    dm.prepare_data()
    dm.setup()
    return dm


def run(method: str, lr: float, steps: int, eval_every: int, val_examples: int = VAL_EXAMPLES, threads: int = 2,
        seed: int = 0, seq_len: int = SEQ_LEN, batch: int = BATCH, general: bool = True, greedy: bool = False,
        prose_blocks: int = 4, initial: dict | None = None, progress: str | None = None, weight_decay: float = 0.0) -> dict:
    """One method at one learning rate; the held-out loss (and the general-ability probes) every ``eval_every`` steps.

    ``seed`` orders the training batches (seed 0: the data module's own order) and draws HFT's mask and SFT's
    initial entries; ``weight_decay`` is the rule's (on SFT's deltas: toward the base); the
    held-out examples are the same for every seed. ``general=False`` skips the general-ability probes,
    ``greedy`` adds the greedy-answer check to them, ``prose_blocks`` is the prose blocks per text.
    ``initial``: the base model's evaluations, if known, recorded as step 0 instead of evaluating again.
    With ``steps=0`` this evaluates the base model only. ``progress``: a JSON file that holds the curve so far,
    rewritten after every evaluation.
    """
    import json
    from pathlib import Path

    import torch
    from general_ability import GeneralAbility
    from memory_speed import lora_parameter_count
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_lightning.data.resumable import ResumableDataLoader
    from lomo_lightning.models import smollm2_directory

    qc.quiet()
    torch.set_num_threads(threads)
    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    instruct = instruct_data(tokenizer, val_examples, seq_len, batch)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
    budget = lora_parameter_count(model, LORA_RANK)  # SFT at LoRA's trainable count exactly
    rule_name = {"sft_ma": "sft_sm3"}.get(method, method)
    trainer = qc.Trainer(model, rule_name, lr=lr, total_steps=steps, lora_rank=LORA_RANK, sft_budget=budget, seed=seed,
                         weight_decay=weight_decay)
    val = instruct.val_dataloader()
    evals: dict[str, Any] = {"instruct_val_loss": lambda: qc.evaluate(trainer.model, val)}
    if general:
        ability = GeneralAbility(tokenizer, blocks_per_text=prose_blocks)
        evals["general"] = lambda: ability.evaluate(trainer.model, greedy=greedy)

    def train_loader() -> Any:
        # the data module's loader, but shuffled by ``seed``: the split (and so the held-out set) stays seed 0's
        return ResumableDataLoader(instruct.train_dataset, batch_size=batch, seed=seed, collate_fn=instruct.collator())

    def save(curve: list[dict]) -> None:
        if progress is not None:
            Path(progress).write_text(json.dumps({"method": method, "lr": lr, "seed": seed, "curve": curve}))

    out = qc.train(trainer, qc.forever(train_loader), steps, evals, eval_every, initial=initial, on_record=save)
    out.update(method=method, lr=lr, seed=seed)
    return out


def forgetting_at(run: dict, target: float, keys: tuple[str, ...] = ("prose_loss", "qa_loss")) -> dict[str, float] | None:
    """The change of the general-ability ``keys`` from the base model's, where ``run`` first reaches ``target``.

    Linear interpolation between the two evaluations around the crossing; ``None`` if it never gets there.
    """
    curve = run["curve"]
    base = curve[0]["general"]
    if curve[0]["instruct_val_loss"] <= target:  # already there before training: nothing changed yet
        return dict.fromkeys(keys, 0.0)
    for before, after in zip(curve, curve[1:]):
        if after["instruct_val_loss"] <= target:
            span = before["instruct_val_loss"] - after["instruct_val_loss"]
            w = 1.0 if span <= 0 else (before["instruct_val_loss"] - target) / span
            return {key: (1 - w) * before["general"][key] + w * after["general"][key] - base[key] for key in keys}
    return None


def best_runs(runs: list[dict]) -> dict[str, dict]:
    """Each method's run with the lowest final held-out loss, in the order of ``LRS``."""
    methods = [m for m in LRS if any(r["method"] == m for r in runs)]
    return {m: min((r for r in runs if r["method"] == m), key=lambda r: r["curve"][-1]["instruct_val_loss"]) for m in methods}


def report(runs: list[dict], steps: int) -> str:
    best = best_runs(runs)
    methods = list(best)
    start = runs[0]["curve"][0]
    lines = [
        f"# SmolLM2-135M-Instruct on py_instruct, {steps} steps (batch {BATCH} x <= {SEQ_LEN} tokens)",
        "",
        f"Base model: held-out response loss {start['instruct_val_loss']:.4f}, prose loss "
        f"{start['general']['prose_loss']:.4f}, QA answer loss {start['general']['qa_loss']:.4f}.",
        "",
        "| method | lr | trainable | held-out response loss | prose loss rise | QA loss rise | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (list(LRS).index(r["method"]), r["lr"])):
        end = r["curve"][-1]
        mark = " **(best)**" if best[r["method"]] is r else ""
        lines.append(
            f"| {LABELS[r['method']]}{mark} | {r['lr']:g} | {r['trainable'] / 1e6:.2f}M | {end['instruct_val_loss']:.4f} "
            f"| {end['general']['prose_loss'] - start['general']['prose_loss']:+.4f} "
            f"| {end['general']['qa_loss'] - start['general']['qa_loss']:+.4f} | {r['seconds'] / steps:.1f} |"
        )
    final = {m: best[m]["curve"][-1]["instruct_val_loss"] for m in methods}
    lines.append("")
    if {"adamw", "adalomo"} <= set(final):
        ratio = final["adalomo"] / final["adamw"]
        lines.append(f"- AdaLomo vs AdamW held-out loss: {ratio:.4f}x (target <= 1.02x)")
    if "lora" in final:
        for m in ("sft_ag", "sft_ma"):
            if m in final:
                lines.append(f"- {LABELS[m]} {final[m]:.4f} vs LoRA {final['lora']:.4f}: "
                             f"{'at most' if final[m] <= final['lora'] else 'above'} LoRA's")
    if {"adalomo", "hft"} <= set(final):
        # equal target loss: the worse of the two methods' final losses, reached by both
        target = max(final["adalomo"], final["hft"])
        full, half = forgetting_at(best["adalomo"], target), forgetting_at(best["hft"], target)
        if full and half:
            for key in ("prose_loss", "qa_loss"):
                ratio = half[key] / full[key] if full[key] > 0 else float("nan")
                lines.append(f"- forgetting at equal held-out loss {target:.4f}, {key} rise: HFT {half[key]:+.4f} vs "
                             f"full {full[key]:+.4f} ({ratio:.2f}x; target <= 0.6x)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = qc.arguments(__doc__, steps=100, workers=1)
    parser.add_argument("--methods", nargs="+", choices=list(LRS), default=list(LRS))
    parser.add_argument("--one-lr", action="store_true", help="only the first learning rate of each method's grid")
    parser.add_argument("--grid-index", type=int, default=None,
                        help="only the learning rate at this index of each grid, merged with earlier runs of the same steps")
    parser.add_argument("--val-examples", type=int, default=VAL_EXAMPLES)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--name", default=NAME, help="the results' file name (benchmarks/results/<name>.json/.md/.png)")
    args = parser.parse_args()

    def grid(method: str) -> list[float]:
        if args.grid_index is not None:
            return LRS[method][args.grid_index:args.grid_index + 1]
        return LRS[method][:1] if args.one_lr else LRS[method]

    jobs = [dict(method=m, lr=lr, steps=args.steps, eval_every=args.eval_every, val_examples=args.val_examples, threads=args.threads)
            for m in args.methods for lr in grid(m)]
    runs = qc.run_pool(run, jobs, workers=args.workers)
    path = qc.RESULTS / f"{args.name}.json"
    previous = json.loads(path.read_text()) if path.exists() else None
    if previous and previous["steps"] == args.steps:
        if args.grid_index is not None:  # one column of the grids: keep every other learning rate run before
            done = {(r["method"], r["lr"]) for r in runs}
            runs = [r for r in previous["runs"] if (r["method"], r["lr"]) not in done] + runs
        elif set(args.methods) != set(LRS):  # a subset of methods: keep the other methods' runs
            runs = [r for r in previous["runs"] if r["method"] not in args.methods] + runs
    lrs_run = {m: sorted({r["lr"] for r in runs if r["method"] == m}) for m in LRS}
    text = report(runs, args.steps)
    qc.RESULTS.mkdir(exist_ok=True)
    (qc.RESULTS / f"{args.name}.md").write_text(text)
    path.write_text(json.dumps({
        "environment": qc.environment(), "steps": args.steps, "lora_rank": LORA_RANK,
        "data": f"py_instruct through the chat template (seq {SEQ_LEN}, batch {BATCH}, prompt masked, {args.val_examples} val examples)",
        "lr_grid": LRS, "lrs_run": lrs_run,
        "schedule": "linear warm-up 5%, cosine to 10%", "runs": runs}, indent=2))
    print(text)
    plot(runs, args.name)


def plot(runs: list[dict], name: str = NAME) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = dict(zip(LRS, ("black", "tab:red", "tab:orange", "tab:blue", "tab:gray", "tab:green", "tab:purple")))
    # each method's best learning rate only: a diverged grid point would flatten every other curve
    for r in best_runs(runs).values():
        curve = r["curve"]
        label = f"{LABELS[r['method']]} lr={r['lr']:g}"
        axes[0].plot([p["step"] for p in curve], [p["instruct_val_loss"] for p in curve], color=colors[r["method"]], label=label)
        x = [p["instruct_val_loss"] for p in curve]
        for ax, key in zip(axes[1:], ("prose_loss", "qa_loss")):
            ax.plot(x, [p["general"][key] for p in curve], marker="o", ms=3, color=colors[r["method"]], label=label)
    axes[0].set(xlabel="step", ylabel="held-out response loss (py_instruct)")
    for ax, key in zip(axes[1:], ("English prose loss", "fixed-QA answer loss")):
        ax.set(xlabel="held-out response loss (lower: better fine-tuned)", ylabel=f"{key} (higher: more forgotten)")
        ax.invert_xaxis()
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("SmolLM2-135M-Instruct: fine-tuning progress and what it forgets")
    fig.tight_layout()
    fig.savefig(qc.RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
