"""DPO with fused updates on SmolLM2-135M-Instruct (fp32, CPU): its memory against SFT, and whether it teaches a preference.

Two parts, one command each (results in ``benchmarks/results/dpo_memory.*`` and ``claims_dpo.*``)::

    python benchmarks/dpo.py memory     # MemTracker peaks of one fused step each, ~15 minutes on 2 quiet cores
    python benchmarks/dpo.py quality    # DPO on hard pairs against two controls, ~40 CPU-minutes, one process

**memory**: the MemTracker peak (deterministic) of a fused AdaLomo step on one batch of stdlib preference pairs
(``py_preference``, SmolLM2's chat template; 2 pairs = 4 sequences of up to 256 tokens), for:

- ``sft``: the causal-LM loss on the same 4 sequences (what an SFT step on the pair batch costs);
- ``dpo``: the DPO loss with precomputed reference log-probabilities (no reference model in memory);
- ``dpo_resident_reference``: the DPO loss with a frozen copy of the model computing the reference in the step
  (what a trainer without precomputation holds);

each with the full logits and with the log-probabilities computed 128 tokens at a time. The target: ``dpo``
within 1.05x of ``sft``. The first step is tracked (AdaLomo creates its small state inside it).

**quality**: preference tuning on hard pairs (``py_preference``: the rejected body is the chosen one with one
mutation that still parses), one process, one torch thread. A short pilot picks the learning rate on pairs of
training-file functions not trained on; then, from the base model, at that rate and for the same steps on the
same pairs: DPO with full fine-tuning and with HFT (fused AdaLomo, sigmoid, beta 0.1), and two controls, DPO on
randomly swapped labels and SFT on the chosen side. Measured on held-out pairs: the preference accuracy (summed
and per-token log-probability of chosen against rejected; the base model's from its cached reference values),
its change from the base model, the change of ``logps/chosen`` and ``logps/rejected``; and greedy completions of
held-out bodies (share that parse, share that match). 95% intervals: bootstrap over functions. Each run is
cached under ``benchmarks/runs/claims/`` by its configuration, so an interrupted command resumes.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import platform
import random
import re
import sys
import textwrap
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
# quality: preference tuning on hard pairs

QUALITY_SEQ_LEN = 192  # pairs are kept whole: a response cut short could hide its mutation (a tie both ways)
HELD_OUT, PILOT_PAIRS, GENERATED = 200, 32, 50
STEPS, PAIRS_PER_STEP = 24, 2
PILOT_STEPS, PILOT_LRS = 8, (3e-4, 1e-3)
RUNS = {
    "base": "base model (the reference)",
    "dpo_full": "DPO, full fine-tuning",
    "dpo_hft": "DPO, HFT (half of each block frozen)",
    "swap": "control: DPO on randomly swapped labels",
    "sft": "control: SFT on the chosen side",
}


def hard_pairs(tokenizer, model) -> dict[str, Any]:
    """Held-out, training and pilot pairs (whole ones only), with the base model's reference values (cached).

    Held-out: the first :data:`HELD_OUT` pairs of the held-out files (sorted by length: less padding); training:
    ``STEPS * PAIRS_PER_STEP`` pairs of the training files in a seeded order; pilot: :data:`PILOT_PAIRS` more
    training-file pairs of functions not trained on, so that the learning rate is picked without the held-out set.
    """
    from lomo_lightning.data import PyPreferenceDataModule
    from lomo_lightning.objectives import add_reference_log_probs, reference_log_probs

    dm = PyPreferenceDataModule(tokenizer, seq_len=QUALITY_SEQ_LEN, batch_size=4, val_fraction=0.1, max_val_examples=512)
    dm.prepare_data()
    dm.setup("fit")

    def whole(dataset) -> list[int]:
        sides = zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])
        return [i for i, (c, r) in enumerate(sides) if max(len(c), len(r)) < QUALITY_SEQ_LEN]

    held_out = dm.val_dataset.select(whole(dm.val_dataset)[:HELD_OUT])
    held_out = held_out.select(sorted(range(len(held_out)), key=lambda i: len(held_out[i]["chosen_input_ids"])))
    order = whole(dm.train_dataset)
    random.Random(0).shuffle(order)
    chosen = dm.train_dataset["chosen_input_ids"]
    trained = order[: STEPS * PAIRS_PER_STEP]
    seen = {tuple(chosen[i]) for i in trained}
    pilot = [i for i in order[len(trained) :] if tuple(chosen[i]) not in seen][:PILOT_PAIRS]
    splits = {"held_out": held_out, "train": dm.train_dataset.select(trained), "pilot": dm.train_dataset.select(pilot)}
    for name, dataset in splits.items():
        values = reference_log_probs(model, dataset, dm.collator(), batch_size=4, cache_dir=dm.cache_dir)
        splits[name] = list(add_reference_log_probs(dataset, values))
    return dict(splits, collator=dm.collator())


def swapped(pair: dict) -> dict:
    sides = {f"{a}_{c}": pair[f"{b}_{c}"] for a, b in (("chosen", "rejected"), ("rejected", "chosen")) for c in ("input_ids", "labels")}
    return dict(sides, reference_logps=pair["reference_logps"][::-1])


def tune(kind: str, lr: float, steps: int, pairs: list[dict], collator) -> tuple[Any, list[float]]:
    """The base model after ``steps`` fused AdaLomo steps of ``kind`` on ``pairs`` in order, and the training losses.

    Linear warm-up 5%, then cosine to 10% (as the other claims studies). ``dpo_*``, ``swap``: sigmoid DPO
    (beta :data:`BETA`); ``swap``: each pair's sides swapped with probability 1/2 (seeded); ``sft``: the
    causal-LM loss of the chosen rows only (prompt masked).
    """
    import torch
    from quality_common import schedule

    from lomo_lightning import AdaLomo, FusedUpdater, HalfFineTuning
    from lomo_lightning.models import smollm2_directory
    from lomo_lightning.objectives import DPOObjective

    model = load_model(smollm2_directory())
    if kind == "dpo_hft":
        HalfFineTuning(ratio=0.5, seed=0).apply(model)
    optimizer = AdaLomo([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, steps, max(1, steps // 20)))
    updater = FusedUpdater(model, optimizer)
    if kind == "swap":
        pairs = [swapped(p) if flip else p for p, flip in zip(pairs, random.Random(0).choices((False, True), k=len(pairs)))]
    losses = []
    for step in range(steps):
        batch = collator(pairs[step * PAIRS_PER_STEP : (step + 1) * PAIRS_PER_STEP])
        if kind == "sft":
            half = len(batch["input_ids"]) // 2
            loss = model(**{key: batch[key][:half] for key in ("input_ids", "attention_mask", "labels")}).loss
        else:
            loss = DPOObjective(beta=BETA)(model, batch).losses.mean()
        updater.backward(loss)
        scheduler.step()
        losses.append(float(loss))
        print(f"  {kind} lr={lr:g} step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    return model.eval(), losses


def pair_logps(model, pairs: list[dict], collator) -> list[list[float]]:
    """Each pair's ``[chosen, rejected, DPO loss]`` under ``model``: summed log-probabilities, by the DPO objective."""
    import torch

    from lomo_lightning.objectives import DPOObjective

    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), 4):
            p = DPOObjective(beta=BETA)(model, collator(pairs[start : start + 4]))
            out += [list(v) for v in zip(p.chosen_logps.tolist(), p.rejected_logps.tolist(), p.losses.tolist())]
    return out


def prompt_and_body(pair: dict) -> tuple[list[int], list[int]]:
    prompt = pair["chosen_labels"].count(-100)  # the prompt's tokens are masked, and only they
    return pair["chosen_input_ids"][:prompt], pair["chosen_input_ids"][prompt:]


def completions(model, tokenizer, prompts: list[list[int]], lengths: list[int], batch: int = 10) -> list[str]:
    """Greedy completions of ``prompts`` (token ids), left-padded batches, each up to its longest reference + 32 tokens."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = {}
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in rows])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths[i] for i in rows) + 32,
                                 do_sample=False, pad_token_id=pad)
        texts.update({i: tokenizer.decode(row[width:], skip_special_tokens=True) for i, row in zip(rows, out)})
    return [texts[i] for i in range(len(prompts))]


def code_of(text: str) -> str:
    """A completion as a body: the block after a ```python fence if it has one, else what comes before any fence;
    if it starts with a ``def`` line (the model wrote the function again), that function's body, dedented."""
    fenced = re.search(r"```(?:python|py)\n(.*?)(?:```|$)", text, re.S)
    code = fenced.group(1) if fenced else re.sub(r"^```.*\n?", "", text.strip()).split("```")[0]
    lines = code.strip("\n").splitlines()
    if lines and lines[0].startswith("def "):  # its body: the indented lines after it
        body = itertools.takewhile(lambda line: not line.strip() or line[0] in " \t", lines[1:])
        lines = textwrap.dedent("\n".join(body)).splitlines()
    return "\n".join(lines).strip()


def syntax(body: str) -> str | None:
    """The body's syntax tree as text (a leading docstring left out: the prompt has it), or None if it does not
    parse or holds nothing else."""
    try:
        tree = ast.parse(body)
    except (SyntaxError, ValueError):
        return None
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        tree.body = tree.body[1:]
    return ast.dump(tree) if tree.body else None


def quality_run(kind: str, lr: float, steps: int, split: str, data: dict, tokenizer, generation: list[int]) -> dict[str, Any]:
    """One run (cached by its configuration): the tuned model's held-out log-probabilities and greedy completions."""
    from claims_smollm2 import cache_path

    config = dict(method=kind, lr=lr, seed=0, steps=steps, pairs_per_step=PAIRS_PER_STEP, held_out=HELD_OUT,
                  seq_len=QUALITY_SEQ_LEN, beta=BETA, split=split)
    path = cache_path(config)
    if path.exists():
        return json.loads(path.read_text())
    from lomo_lightning.models import smollm2_directory

    start = time.perf_counter()
    model, losses = (load_model(smollm2_directory()).eval(), []) if kind == "base" else tune(kind, lr, steps, data["train"], data["collator"])
    pairs = data[config["split"]]
    out: dict[str, Any] = dict(config, train_loss=losses, logps=pair_logps(model, pairs, data["collator"]) if kind != "base" else None)
    if config["split"] == "held_out" and kind != "swap":  # the label-swap control is judged by its preferences only
        prompts, bodies = zip(*(prompt_and_body(pairs[i]) for i in generation))
        out["completions"] = completions(model, tokenizer, list(prompts), [len(b) for b in bodies])
    out["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print(f"done {kind} lr={lr:g} steps={steps} in {out['seconds']:.0f}s", flush=True)
    return out


def bootstrap(values, groups, reps: int = 2000) -> dict[str, float]:
    """The mean of ``values`` and its 95% interval, resampling whole functions (the pairs of a function share
    its chosen body, so they are not independent): percentiles of ``reps`` seeded resamples."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    ids = np.unique(np.asarray(groups), return_inverse=True)[1]
    sums, counts = np.bincount(ids, values), np.bincount(ids)
    draws = np.random.default_rng(0).integers(0, len(counts), (reps, len(counts)))
    low, high = np.percentile(sums[draws].sum(1) / counts[draws].sum(1), [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": len(values)}


def quality_measures(data: dict, runs: dict[str, dict], generation: list[int], tokenizer) -> dict[str, Any]:
    """Per run: preference accuracies, their change from the base model, the log-probabilities' change, generation."""
    import numpy as np

    pairs = data["held_out"]
    groups = [hash(tuple(p["chosen_input_ids"])) for p in pairs]
    base = np.array([p["reference_logps"] for p in pairs])
    tokens = np.array([[sum(t != -100 for t in p[f"{s}_labels"]) for s in ("chosen", "rejected")] for p in pairs])
    bodies = [code_of(tokenizer.decode(prompt_and_body(pairs[i])[1], skip_special_tokens=True)) for i in generation]
    logps = {kind: base if kind == "base" else np.array(run["logps"])[:, :2] for kind, run in runs.items()}
    wins = {kind: {"summed": lp[:, 0] > lp[:, 1], "per_token": lp[:, 0] / tokens[:, 0] > lp[:, 1] / tokens[:, 1]} for kind, lp in logps.items()}
    out: dict[str, Any] = {}
    for kind, run in runs.items():
        row: dict[str, Any] = {}
        for measure in ("summed", "per_token"):
            row[measure] = bootstrap(wins[kind][measure], groups)
            row[f"{measure}_minus_base"] = bootstrap(wins[kind][measure].astype(float) - wins["base"][measure], groups)
            for other in ("sft", "swap"):
                if kind.startswith("dpo") and other in runs:
                    row[f"{measure}_minus_{other}"] = bootstrap(wins[kind][measure].astype(float) - wins[other][measure], groups)
        change = logps[kind] - base
        row["reward_accuracy"] = bootstrap(change[:, 0] > change[:, 1], groups)
        row["logps_chosen_change"], row["logps_rejected_change"] = (bootstrap(change[:, i], groups) for i in (0, 1))
        out[kind] = row
        if "completions" not in run:
            continue
        trees = [syntax(code_of(t)) for t in run["completions"]]
        row["parses"] = bootstrap([t is not None for t in trees], generation)
        row["matches"] = bootstrap([t is not None and t == syntax(b) for t, b in zip(trees, bodies)], generation)
    return out


def quality_markdown(result: dict) -> str:
    from claims_smollm2 import fmt

    def acc(ci: dict) -> str:
        return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"

    m, pilot = result["measures"], result["pilot"]
    lines = [
        "# Preference tuning on hard pairs: SmolLM2-135M-Instruct (fp32), DPO against two controls",
        "",
        f"`py_preference` pairs: a stdlib function's signature and docstring through the chat template; chosen: its "
        f"body; rejected: the body with one mutation that still parses. Whole pairs of <= {QUALITY_SEQ_LEN} tokens; "
        f"held out: {HELD_OUT} pairs from {result['held_out_functions']} functions of held-out files (bodies unseen in "
        f"training). Fused AdaLomo at lr {result['lr']:g} (the pilot's pick), {STEPS} steps of {PAIRS_PER_STEP} pairs "
        f"(linear warm-up 5%, cosine to 10%), seed 0; DPO: sigmoid, beta {BETA}, reference log-probabilities of the "
        "base model cached. Controls at equal steps and lr: DPO on the same pairs with each pair's sides swapped "
        "with probability 1/2, and SFT (causal-LM loss, prompt masked) on the chosen side only.",
        "",
        "Preference accuracy: the share of held-out pairs where the model gives the chosen body a higher summed "
        "(or per-token mean) log-probability than the rejected one. 95% intervals: bootstrap over functions (a "
        "function's pairs share its chosen body); differences are paired on the same pairs.",
        "",
        "| model | summed accuracy | - base | per-token accuracy | - base | reward accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for kind, row in m.items():
        reward = "- (ties: policy = reference)" if kind == "base" else acc(row["reward_accuracy"])
        lines.append(f"| {RUNS[kind]} | {acc(row['summed'])} | {fmt(row['summed_minus_base'], 3)} | "
                     f"{acc(row['per_token'])} | {fmt(row['per_token_minus_base'], 3)} | {reward} |")
    lines += [
        "",
        "Where the margin comes from (mean change from the base model over held-out pairs, summed log-probabilities), "
        f"and greedy completion of {GENERATED} held-out bodies (prompt -> body, up to the real body's length + 32 tokens; "
        "the code is the block after a ```python fence, else the text before any fence, and the body of a repeated "
        "`def`; matches: the same syntax tree as the real body, so formatting, comments and a repeated docstring aside):",
        "",
        "| model | logps/chosen change | logps/rejected change | completions that parse | match the real body |",
        "|---|---|---|---|---|",
    ]
    for kind, row in m.items():
        change = "| 0 | 0 |" if kind == "base" else f"| {fmt(row['logps_chosen_change'], 2)} | {fmt(row['logps_rejected_change'], 2)} |"
        generated = f"{acc(row['parses'])} | {acc(row['matches'])}" if "parses" in row else "not generated | "
        lines.append(f"| {RUNS[kind]} {change} {generated} |")
    lines += ["", "## Targets", ""]
    for kind in ("dpo_full", "dpo_hft"):
        for measure in ("summed", "per_token"):
            d = m[kind][f"{measure}_minus_base"]
            lines.append(f"- {RUNS[kind]} - base, {measure.replace('_', '-')}: {fmt(d, 3)}: "
                         + ("**met** (the interval excludes 0)" if d["low"] > 0 else "**not met** (the interval includes 0 or lies below it)"))
    for measure in ("summed", "per_token"):
        base, swap = m["base"][measure], m["swap"][measure]["mean"]
        inside = base["low"] <= swap <= base["high"]
        lines.append(f"- label swap within the base's interval, {measure.replace('_', '-')}: {swap:.3f} against "
                     f"{acc(base)}: {'**met**' if inside else '**not met**'}")
        for kind in ("dpo_full", "dpo_hft"):
            d = m[kind][f"{measure}_minus_sft"]
            verdict = "above, the interval excludes 0" if d["low"] > 0 else "below, the interval excludes 0" if d["high"] < 0 else "no difference established"
            lines.append(f"- {RUNS[kind]} - SFT on chosen, {measure.replace('_', '-')}: {fmt(d, 3)}: {verdict}")
    lines += [
        "",
        f"## Pilot (full fine-tuning, {PILOT_STEPS} DPO steps, {PILOT_PAIRS} pairs of training-file functions not trained on)",
        "",
        "| lr | DPO loss | summed accuracy | per-token accuracy |",
        "|---|---|---|---|",
    ]
    for row in pilot:
        lines.append(f"| {row['lr']} | {row['loss']:.4f} | {row['summed']:.3f} | {row['per_token']:.3f} |")
    lines += ["", f"The lr of the lowest pilot DPO loss is used above. Time on 2 shared cores (one process, one torch "
              f"thread, nice 10): the runs {result['run_seconds'] / 60:.0f} min, pilot included, plus the data and the "
              f"reference pass; this invocation {result['seconds'] / 60:.0f} min (cached runs are not run again)."]
    return "\n".join(lines) + "\n"


def quality_plot(measures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    kinds = list(measures)
    panels = ((kinds, ("summed", "per_token"), "held-out preference accuracy (95% interval)"),
              (kinds[1:], ("logps_chosen_change", "logps_rejected_change"), "change from the base model (summed log-prob)"))
    for ax, (names, keys, label) in zip(axes, panels):
        for offset, key in zip((-0.2, 0.2), keys):
            cis = [measures[k][key] for k in names]
            ax.errorbar([i + offset for i in range(len(names))], [c["mean"] for c in cis], fmt="o", capsize=4, label=key,
                        yerr=[[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]])
        ax.set(ylabel=label, xticks=range(len(names)), xticklabels=names)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].axhline(0, color="gray", lw=0.8)
    fig.suptitle("SmolLM2-135M-Instruct, hard preference pairs: DPO against label-swap and SFT-on-chosen controls")
    fig.tight_layout()
    fig.savefig(RESULTS / "claims_dpo.png", dpi=120)


def run_quality() -> None:
    from transformers import AutoTokenizer

    from lomo_lightning.models import smollm2_directory

    start = time.perf_counter()
    quiet(1)
    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    data = hard_pairs(tokenizer, load_model(directory))
    first = {}  # one body per function, in the held-out order
    for i, pair in enumerate(data["held_out"]):
        first.setdefault(tuple(pair["chosen_input_ids"]), i)
    generation = sorted(first.values())[:GENERATED]
    pilot, seconds = [], 0.0
    for lr in PILOT_LRS:
        run = quality_run("dpo_full", lr, PILOT_STEPS, "pilot", data, tokenizer, generation)
        logps, n, seconds = run["logps"], len(run["logps"]), seconds + run["seconds"]
        tokens = [[sum(t != -100 for t in p[f"{s}_labels"]) for s in ("chosen", "rejected")] for p in data["pilot"]]
        pilot.append({"lr": lr, "loss": sum(x[2] for x in logps) / n, "summed": sum(c > r for c, r, _ in logps) / n,
                      "per_token": sum(c / t[0] > r / t[1] for (c, r, _), t in zip(logps, tokens)) / n})
    lr = min(pilot, key=lambda row: row["loss"])["lr"]
    runs = {kind: quality_run(kind, 0.0 if kind == "base" else lr, STEPS, "held_out", data, tokenizer, generation) for kind in RUNS}
    measures = quality_measures(data, runs, generation, tokenizer)
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)", "lr": lr, "steps": STEPS, "pairs_per_step": PAIRS_PER_STEP, "beta": BETA,
        "held_out_pairs": len(data["held_out"]), "held_out_functions": len(first), "generated": GENERATED,
        "pilot": pilot, "measures": measures, "train_loss": {k: r["train_loss"] for k, r in runs.items()},
        "seconds": time.perf_counter() - start, "run_seconds": seconds + sum(r["seconds"] for r in runs.values()),
        "environment": environment(1),
    }
    write(result, "claims_dpo", quality_markdown(result))
    quality_plot(measures)


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
    parser.add_argument("part", choices=["memory", "quality"])
    parser.add_argument("--threads", type=int, default=2, help="memory: torch threads")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    run_memory(args.threads) if args.part == "memory" else run_quality()

if __name__ == "__main__":
    main()
