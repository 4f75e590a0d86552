"""DPO with fused updates on SmolLM2-135M-Instruct (fp32, CPU): its memory against SFT, and what a short run learns and forgets.

Two parts, one command each (results in ``benchmarks/results/dpo_memory.*`` and ``dpo_quality.*``)::

    python benchmarks/dpo.py memory     # MemTracker peaks of one fused step each, ~15 minutes on 2 quiet cores
    python benchmarks/dpo.py quality    # full vs HFT, 20 DPO steps each (two processes in parallel), ~1 hour

**memory**: the MemTracker peak (deterministic) of a fused AdaLomo step on one batch of stdlib preference pairs
(``py_preference``, SmolLM2's chat template; 2 pairs = 4 sequences of up to 256 tokens), for:

- ``sft``: the causal-LM loss on the same 4 sequences (what an SFT step on the pair batch costs);
- ``dpo``: the DPO loss with precomputed reference log-probabilities (no reference model in memory);
- ``dpo_resident_reference``: the DPO loss with a frozen copy of the model computing the reference in the step
  (what a trainer without precomputation holds);

each with the full logits and with the log-probabilities computed 128 tokens at a time. The target: ``dpo``
within 1.05x of ``sft``. The first step is tracked (AdaLomo creates its small state inside it).

**quality**: from the same base model, full fine-tuning and HFT (``HalfFineTuning(0.5)``), both with fused AdaLomo,
sigmoid DPO with beta 0.1 and a linear schedule with 10% warm-up (the HFT paper's DPO stage follows Tülu 2's
recipe); the same pairs in the same order. Measured before and after: held-out reward accuracy and margin on
pairs from held-out stdlib files, and the model's general ability (:mod:`general_ability`: English prose loss and
fixed-QA answer loss; a rise is forgetting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEQ_LEN = 256
MEMORY_PAIRS = 2
CHUNK_TOKENS = 128
BETA = 0.1
VAL_PAIRS = 48


def quiet(threads: int) -> None:
    import datasets
    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    torch.set_num_threads(threads)


def load_model(directory: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()


def pair_data(tokenizer, batch_size: int, max_examples: int | None = None, max_val_examples: int = 64):
    from lomo_lightning.data import PyPreferenceDataModule

    dm = PyPreferenceDataModule(
        tokenizer, seq_len=SEQ_LEN, batch_size=batch_size, max_examples=max_examples, max_val_examples=max_val_examples
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def with_reference(dm, model, split: str) -> None:
    """Attach the reference log-probabilities of ``model`` (cached under the data's cache directory)."""
    from lomo_lightning.objectives import add_reference_log_probs, reference_log_probs

    dataset = getattr(dm, f"{split}_dataset")
    values = reference_log_probs(model, dataset, dm.collator(), batch_size=dm.batch_size, cache_dir=dm.cache_dir)
    setattr(dm, f"{split}_dataset", add_reference_log_probs(dataset, values))


# ---------------------------------------------------------------------------------------------------------
# memory


def measure_memory(kind: str, chunk_tokens: int | None, directory: str, batch: dict) -> dict[str, Any]:
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from lomo_lightning import AdaLomo, FusedUpdater
    from lomo_lightning.objectives import DPOObjective, chunked_causal_lm_loss, sequence_log_probs

    model = load_model(directory)
    optimizer = AdaLomo(model.parameters(), lr=1e-4)
    updater = FusedUpdater(model, optimizer)
    objective = DPOObjective(beta=BETA)
    reference_model = load_model(directory).eval().requires_grad_(False) if kind == "dpo_resident_reference" else None
    lm_batch = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}

    def step() -> None:
        if kind == "sft":
            if chunk_tokens is None:
                loss = model(**lm_batch).loss
            else:
                loss = chunked_causal_lm_loss(model, chunk_tokens=chunk_tokens, **lm_batch)
        else:
            pairs = dict(batch)
            if reference_model is not None:
                with torch.no_grad():
                    pairs["reference_logps"] = sequence_log_probs(
                        reference_model, batch["input_ids"], batch["labels"], chunk_tokens, attention_mask=batch["attention_mask"]
                    )
            loss = objective(model, pairs, chunk_tokens).losses.mean()
        updater.backward(loss)

    from memory_speed import peak_by_category, skip_frozen_parameters

    tracker = MemTracker()
    if reference_model is not None:
        skip_frozen_parameters(tracker, reference_model)  # MemTracker would hook a gradient the frozen copy refuses
    tracker.track_external(model, optimizer, *([reference_model] if reference_model is not None else []))
    start = time.perf_counter()
    with tracker:
        step()  # AdaLomo's state (O(rows + cols)) is created inside it
    seconds = time.perf_counter() - start
    by_category = peak_by_category(tracker)
    return {
        "kind": kind,
        "chunk_tokens": chunk_tokens,
        "peak_bytes": sum(by_category.values()),
        "peak_by_category_bytes": by_category,
        "seconds_tracked_step": seconds,
    }


def run_memory(threads: int) -> None:
    from transformers import AutoTokenizer

    from lomo_lightning.models import smollm2_directory

    quiet(threads)
    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dm = pair_data(tokenizer, batch_size=MEMORY_PAIRS, max_examples=16)
    with_reference(dm, load_model(directory), "train")
    batch = dm.collator()([dm.train_dataset[i] for i in range(MEMORY_PAIRS)])
    rows = []
    for chunk_tokens in (None, CHUNK_TOKENS):
        for kind in ("sft", "dpo", "dpo_resident_reference"):
            rows.append(measure_memory(kind, chunk_tokens, directory, batch))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "peak_by_category_bytes"}), flush=True)
    tokens = int(batch["attention_mask"].sum())
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "batch": {"pairs": MEMORY_PAIRS, "sequences": int(batch["input_ids"].shape[0]), "padded_length": int(batch["input_ids"].shape[1]), "tokens": tokens},
        "rows": rows,
        "environment": environment(threads),
    }
    for row in rows:
        sft = next(r for r in rows if r["kind"] == "sft" and r["chunk_tokens"] == row["chunk_tokens"])
        row["peak_vs_sft"] = row["peak_bytes"] / sft["peak_bytes"]
    write(result, "dpo_memory", memory_markdown(result))


def memory_markdown(result: dict) -> str:
    batch = result["batch"]
    lines = [
        f"# Fused DPO step vs SFT step, {result['model']}",
        "",
        f"One batch of {batch['pairs']} stdlib preference pairs: {batch['sequences']} sequences padded to "
        f"{batch['padded_length']} tokens ({batch['tokens']} real). Fused AdaLomo; MemTracker peak of one step.",
        "",
        "| step | logits | peak MiB | vs SFT | activations MiB | temporaries MiB |",
        "|---|---|---|---|---|---|",
    ]
    names = {"sft": "SFT (causal-LM loss)", "dpo": "**DPO, precomputed reference**", "dpo_resident_reference": "DPO, reference model in memory"}
    for row in result["rows"]:
        logits = "full" if row["chunk_tokens"] is None else f"chunks of {row['chunk_tokens']}"
        category = row["peak_by_category_bytes"]
        lines.append(
            f"| {names[row['kind']]} | {logits} | {mib(row['peak_bytes']):.1f} | {row['peak_vs_sft']:.3f} | "
            f"{mib(category['activations']):.1f} | {mib(category['temporaries']):.1f} |"
        )
    worst = max(row["peak_vs_sft"] for row in result["rows"] if row["kind"] == "dpo")
    lines += ["", f"Target: DPO with precomputed reference <= 1.05x SFT: {'met' if worst <= 1.05 else 'NOT met'} (worst {worst:.3f})."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# quality


def quality_setup(steps: int, batch_size: int):
    """The tokenizer, the base model, the pairs with their reference log-probabilities (cached) and the ability test."""
    from general_ability import GeneralAbility
    from transformers import AutoTokenizer

    from lomo_lightning.models import smollm2_directory

    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = load_model(directory)
    dm = pair_data(tokenizer, batch_size=batch_size, max_examples=2 * steps * batch_size, max_val_examples=VAL_PAIRS)
    for split in ("train", "val"):
        with_reference(dm, model, split)  # the base model, before any selection or update
    return model, dm, GeneralAbility(tokenizer)


def run_quality_worker(selection: str, steps: int, lr: float, batch_size: int, out: Path, threads: int) -> None:
    import torch
    from transformers import get_scheduler

    from lomo_lightning import AdaLomo, FusedUpdater, HalfFineTuning
    from lomo_lightning.objectives import DPOObjective, reward_metrics

    quiet(threads)
    model, dm, ability = quality_setup(steps, batch_size)  # the reference values come from the cache
    objective = DPOObjective(beta=BETA)
    if selection == "hft":
        HalfFineTuning(ratio=0.5, seed=0).apply(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdaLomo(trainable, lr=lr)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    updater = FusedUpdater(model, optimizer)
    losses, start = [], time.perf_counter()
    batches = (batch for _ in iter(int, 1) for batch in dm.train_dataloader())  # epoch after epoch
    for _ in range(steps):
        loss = objective(model, next(batches)).losses.mean()
        updater.backward(loss)
        scheduler.step()
        losses.append(float(loss))
    seconds = time.perf_counter() - start

    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch in dm.val_dataloader():
            pairs = objective(model, batch)
            sums["loss"] = sums.get("loss", 0.0) + float(pairs.losses.sum())
            for name, values in reward_metrics(pairs).items():
                sums[f"rewards/{name}"] = sums.get(f"rewards/{name}", 0.0) + float(values.sum())
    after = {key: value / len(dm.val_dataset) for key, value in sums.items()}
    result = {
        "selection": selection,
        "lr": lr,
        "steps": steps,
        "pairs_per_step": batch_size,
        "trainable_fraction": sum(p.numel() for p in trainable) / sum(p.numel() for p in model.parameters()),
        "train_loss": losses,
        "after": {**after, **ability.evaluate(model)},
        "train_seconds": seconds,
    }
    out.write_text(json.dumps(result))


def run_quality(steps: int, lr: float, batch_size: int, threads: int) -> None:
    import subprocess
    import tempfile

    quiet(2 * threads)
    model, dm, ability = quality_setup(steps, batch_size)  # fills the reference cache once for both runs
    # the base model is the reference: every reward is 0 and the DPO loss ln 2 (tested), only its ability is measured
    base = {"loss": 0.6931471805599453, "rewards/accuracies": 0.0, "rewards/margins": 0.0, **ability.evaluate(model)}
    del model
    with tempfile.TemporaryDirectory() as tmp:
        workers = {}
        for selection in ("full", "hft"):
            out = Path(tmp) / f"{selection}.json"
            command = [sys.executable, __file__, "quality-worker", selection, "--steps", str(steps), "--lr", str(lr),
                       "--batch-size", str(batch_size), "--threads", str(threads), "--out", str(out)]
            workers[selection] = (subprocess.Popen(command), out)
        runs = []
        for selection, (process, out) in workers.items():
            if process.wait() != 0:
                raise RuntimeError(f"the {selection} run failed")
            runs.append(json.loads(out.read_text()))
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "beta": BETA,
        "val_pairs": len(dm.val_dataset),
        "base": base,
        "runs": runs,
        "environment": environment(threads),
    }
    write(result, "dpo_quality", quality_markdown(result))


def quality_markdown(result: dict) -> str:
    first = result["runs"][0]
    base = result["base"]
    lines = [
        f"# DPO on stdlib preference pairs, {result['model']}: full fine-tuning vs HFT",
        "",
        f"Fused AdaLomo (lr {first['lr']}, linear schedule, 10% warm-up), sigmoid DPO with beta {result['beta']}, "
        f"{first['steps']} steps of {first['pairs_per_step']} pairs; held-out: {result['val_pairs']} pairs from held-out files.",
        "",
        "| | trainable | held-out reward accuracy | reward margin | DPO loss | prose loss (rise) | QA answer loss (rise) |",
        "|---|---|---|---|---|---|---|",
        f"| base model (the reference) | | {base['rewards/accuracies']:.3f} | {base['rewards/margins']:.3f} | "
        f"{base['loss']:.4f} | {base['prose_loss']:.4f} | {base['qa_loss']:.4f} |",
    ]
    for run in result["runs"]:
        after = run["after"]
        name = "full fine-tuning" if run["selection"] == "full" else "HFT (half of each block frozen)"
        lines.append(
            f"| {name} | {run['trainable_fraction']:.1%} | {after['rewards/accuracies']:.3f} | {after['rewards/margins']:.3f} | "
            f"{after['loss']:.4f} | {after['prose_loss']:.4f} ({after['prose_loss'] - base['prose_loss']:+.4f}) | "
            f"{after['qa_loss']:.4f} ({after['qa_loss'] - base['qa_loss']:+.4f}) |"
        )
    lines += [
        "",
        "Reward accuracy is the share of held-out pairs whose chosen response gains more log-probability over the "
        "reference than the rejected one (0 before training: every margin is 0).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------


def mib(x: float) -> float:
    return x / 2**20


def environment(threads: int) -> dict[str, Any]:
    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "note": "shared CPU machine: times are indicative only",
    }


def write(result: dict, name: str, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["memory", "quality", "quality-worker"])
    parser.add_argument("selection", nargs="?", choices=["full", "hft"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.part == "memory":
        run_memory(max(args.threads, 2))
    elif args.part == "quality":
        run_quality(args.steps, args.lr, args.batch_size, args.threads)
    else:
        run_quality_worker(args.selection, args.steps, args.lr, args.batch_size, args.out, args.threads)


if __name__ == "__main__":
    main()
