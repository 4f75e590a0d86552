"""The quality studies' training: fixed batches in the same order for every method, an LR schedule, held-out loss.

:class:`Trainer` is the method table the quality studies' runs were made with (``claims_smollm2.py`` caches its runs
by their settings, so it stays as it was: AdamW with betas (0.9, 0.95), HFT with every matrix eligible, SFT's
reselection every 20 steps). :func:`smollm2_run` is one fine-tuning run of SmolLM2-135M-Instruct on ``py_instruct``
with the general-ability probes; :func:`forgetting_at` reads what a run forgot where it reaches a target loss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .env import quiet
from .methods import lora_config, lora_parameter_count

SMOLLM2_LORA_RANK = 8


def forever(loader_fn: Callable[[], Any]) -> Iterator[dict]:
    while True:
        yield from loader_fn()


def evaluate(model, loader) -> float:
    """Mean loss per predicted token over the whole loader."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """One method on one model: ``step(batch)`` trains on a batch, with the LR schedule applied."""

    def __init__(self, model, method: str, lr: float, total_steps: int, *, weight_decay: float = 0.0,
                 sft_budget: int = 10_000, lora_rank: int = 4, seed: int = 0):
        import torch

        from lomo_lightning import SM3, AdaLomo, FusedUpdater, Lomo, SFTAdamW
        from lomo_lightning.selection import HalfFineTuning, SparseFineTuning

        self.method = method
        self.model = model
        self.sft = None
        self.updater = None
        fused = True
        if method == "adamw":
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
            fused = False
        elif method == "lora":
            from peft import get_peft_model

            self.model = get_peft_model(model, lora_config(lora_rank))
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            fused = False
        elif method in ("sft_ag", "sft_sm3"):
            self.sft = SparseFineTuning(
                num_tunable_weights=sft_budget,
                regrowth="accumulated_gradients" if method == "sft_ag" else "sm3",
                reselection_steps=20,
                selection_accumulation_steps=5,
                total_steps=total_steps,
                seed=seed,  # the initial random active sets
            ).apply(model)
            # SpIEL's rules for the values, fused here one tensor at a time: AdamW with per-entry ages (AG), SM3 (MA);
            # their defaults are the reference's (SFTAdamW eps 1e-6); weight decay pulls the deltas toward the base
            rule = SFTAdamW if method == "sft_ag" else SM3
            self.optimizer = rule(self.sft.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            if method in ("hft", "hft_adalomo"):
                HalfFineTuning(ratio=0.5, seed=seed).apply(model)
            params = [p for p in model.parameters() if p.requires_grad]
            if method == "lomo":
                self.optimizer = Lomo(params, lr=lr, weight_decay=weight_decay)
            else:
                self.optimizer = AdaLomo(params, lr=lr, weight_decay=weight_decay)
        if fused:
            self.updater = FusedUpdater(model, self.optimizer)
        self.trainable = self.sft.budget if self.sft is not None else sum(
            p.numel() for p in self.model.parameters() if p.requires_grad
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: schedule(s, total_steps, max(1, total_steps // 20))
        )

    def step(self, batch: dict) -> float:
        loss = self.model(**batch).loss
        if self.updater is not None:
            self.updater.backward(loss)
            if self.sft is not None:
                self.sft.step(self.optimizer)
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(loss.detach())


def train(trainer: Trainer, batches: Iterator[dict], steps: int, evals: dict[str, Callable[[], Any]],
          eval_every: int, initial: dict[str, Any] | None = None,
          on_record: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Train ``steps`` steps; every ``eval_every`` steps (and at 0 and the end) run every evaluation.

    ``initial``: the evaluations of the untrained model, if already known (every run of a comparison starts
    from the same weights), recorded as step 0 instead of evaluating again. ``on_record(curve)`` is called
    after every evaluation (e.g. to save the curve so far, so a run stopped early still leaves its points).
    """
    curve: list[dict[str, Any]] = []

    def record(step: int) -> None:
        point = {"step": step}
        for name, fn in evals.items():
            point[name] = fn()
        curve.append(point)
        if on_record is not None:
            on_record(curve)

    start = time.perf_counter()
    if initial is None:
        record(0)
    else:
        curve.append({"step": 0, **initial})
    train_losses = []
    for step in range(1, steps + 1):
        train_losses.append(trainer.step(next(batches)))
        if step % eval_every == 0 or step == steps:
            record(step)
    return {
        "curve": curve,
        "train_loss": train_losses,
        "seconds": time.perf_counter() - start,
        "trainable": trainer.trainable,
    }


SEQ_LEN, BATCH, VAL_EXAMPLES = 256, 4, 64


def smollm2_instruct_data(tokenizer, val_examples: int = VAL_EXAMPLES, seq_len: int = SEQ_LEN, batch: int = BATCH) -> Any:
    from lomo_lightning.data import PyInstructDataModule

    dm = PyInstructDataModule(tokenizer, seq_len=seq_len, batch_size=batch, max_val_examples=val_examples)
    dm.prepare_data()
    dm.setup()
    return dm


def smollm2_run(method: str, lr: float, steps: int, eval_every: int, val_examples: int = VAL_EXAMPLES, threads: int = 2,
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
    import torch
    from general_ability import GeneralAbility
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lomo_lightning.data.resumable import ResumableDataLoader
    from lomo_lightning.models import smollm2_directory

    quiet()
    torch.set_num_threads(threads)
    directory = smollm2_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    instruct = smollm2_instruct_data(tokenizer, val_examples, seq_len, batch)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
    budget = lora_parameter_count(model, SMOLLM2_LORA_RANK)  # SFT at LoRA's trainable count exactly
    rule_name = {"sft_ma": "sft_sm3"}.get(method, method)
    trainer = Trainer(model, rule_name, lr=lr, total_steps=steps, lora_rank=SMOLLM2_LORA_RANK, sft_budget=budget, seed=seed,
                      weight_decay=weight_decay)
    val = instruct.val_dataloader()
    evals: dict[str, Any] = {"instruct_val_loss": lambda: evaluate(trainer.model, val)}
    if general:
        ability = GeneralAbility(tokenizer, blocks_per_text=prose_blocks)
        evals["general"] = lambda: ability.evaluate(trainer.model, greedy=greedy)

    def train_loader() -> Any:
        # the data module's loader, but shuffled by ``seed``: the split (and so the held-out set) stays seed 0's
        return ResumableDataLoader(instruct.train_dataset, batch_size=batch, seed=seed, collate_fn=instruct.collator())

    def save(curve: list[dict]) -> None:
        if progress is not None:
            Path(progress).write_text(json.dumps({"method": method, "lr": lr, "seed": seed, "curve": curve}))

    out = train(trainer, forever(train_loader), steps, evals, eval_every, initial=initial, on_record=save)
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

