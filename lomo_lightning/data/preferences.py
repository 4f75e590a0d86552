"""Preference pairs for DPO: a prompt, a chosen and a rejected response; from local files or built from the stdlib.

Records have ``prompt``, ``input`` (optional, may be empty: the Alpaca-style context of instruction
records), ``chosen`` and ``rejected``. The prompt is rendered as for instruction tuning
(:func:`~lomo_lightning.data.instructions.render_prompt`: the tokenizer's chat template when it has one),
and each response is tokenized after it as an instruction example is: ``prompt_ids + response_ids +
eos``, labels -100 on the prompt, the response truncated to ``seq_len``. A pair is dropped when its
prompt alone fills ``seq_len``.

A batch is an ordinary causal-LM batch of ``2 * pairs`` rows, the chosen responses first, then the
rejected ones in the same order, so that one forward serves both sides of every pair; with the
reference model's sequence log-probabilities attached (``reference_logps``, one per row), it is what
:class:`~lomo_lightning.objectives.DPOObjective` takes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lomo_lightning.data.instructions import (
    InstructionCollator,
    JsonInstructionDataModule,
    PyInstructDataModule,
    check_records,
    eos_token_id,
    map_tokenized,
    tokenize_example,
    tokenize_prompts,
)
from lomo_lightning.objectives.dpo import REFERENCE_KEY

PAIR_FIELDS = ("prompt", "input", "chosen", "rejected")
SIDES = ("chosen", "rejected")
# A tokenized pair: both responses after the prompt, as causal-LM rows (then, once computed, its reference values)
PAIR_COLUMNS = tuple(f"{side}_{column}" for side in SIDES for column in ("input_ids", "labels"))



def check_preference_records(records: Dataset, source: str) -> Dataset:
    """Fail on an empty source or a record without ``prompt``/``chosen``/``rejected``; fill a missing ``input`` with ""."""
    return check_records(records, source, fields=PAIR_FIELDS, required=("prompt", "chosen", "rejected"))


def tokenize_pairs(records: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Tokenize preference records into ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels``, dropping the pairs whose prompt alone fills ``seq_len``."""
    eos = eos_token_id(tokenizer)

    def tokenize(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        prompt_ids = tokenize_prompts(tokenizer, batch["prompt"], batch["input"])
        responses = {side: tokenizer(batch[side], add_special_tokens=False)["input_ids"] for side in SIDES}
        columns: dict[str, list[list[int]]] = {column: [] for column in PAIR_COLUMNS}
        for index, prompt in enumerate(prompt_ids):
            examples = {side: tokenize_example(prompt, responses[side][index], eos, seq_len) for side in SIDES}
            if examples["chosen"] is None:  # the prompt fills seq_len, for both sides alike
                continue
            for side, example in examples.items():
                assert example is not None  # the prompt fits, so both sides are tokenized
                columns[f"{side}_input_ids"].append(example["input_ids"])
                columns[f"{side}_labels"].append(example["labels"])
        return columns

    return map_tokenized(records, tokenize, tokenizer, seq_len)


@dataclass
class PreferenceCollator:
    """Pads the chosen rows, then the rejected rows, of a list of tokenized pairs into one causal-LM batch.

    Padding as :class:`~lomo_lightning.data.instructions.InstructionCollator` does; the pairs' reference
    log-probabilities, when the rows have them, become ``reference_logps`` in the same row order.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        rows = [
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
            for side in SIDES
            for pair in features
        ]
        batch = InstructionCollator(self.pad_token_id)(rows)
        if REFERENCE_KEY in features[0]:
            reference = torch.tensor([pair[REFERENCE_KEY] for pair in features], dtype=torch.float32)
            batch[REFERENCE_KEY] = reference.T.reshape(-1)  # (pairs, 2) -> chosen values, then rejected values
        return batch


class PreferencePairs:
    """Turns an instruction data module into one of preference pairs (put it first among the bases).

    Its records are checked as preference records, tokenized by :func:`tokenize_pairs` and batched by
    :class:`PreferenceCollator`; everything else (files, splits, caching) is the instruction module's.
    """

    record_kind = "preference"
    check_records: Callable[[Dataset, str], Dataset] = staticmethod(check_preference_records)
    collator_class = PreferenceCollator

    # the instruction data module's
    tokenizer: PreTrainedTokenizerBase
    seq_len: int
    batch_size: int
    cache_dir: Path
    collator: Callable[[], Callable[[list[dict]], dict[str, Tensor]]]

    def tokenize(self, records: Dataset) -> Dataset:
        return tokenize_pairs(records, self.tokenizer, self.seq_len)


class JsonPreferenceDataModule(PreferencePairs, JsonInstructionDataModule):
    """Preference pairs from local files of ``{"prompt", "input" (optional), "chosen", "rejected"}`` records.

    Args:
        train_file: a ``.json`` (list of records or JSON lines), ``.jsonl`` or ``.parquet`` file.
        val_file: the same for validation; without it, ``val_fraction`` of ``train_file`` is held out
            (a seeded, deterministic split).
        Other arguments as in :class:`~lomo_lightning.data.instructions.InstructionDataModule`.
    """


def shuffled_lines(text: str, seed: int = 0) -> str | None:
    """``text`` with its lines in another order (seeded by ``seed`` and the text), or ``None`` if no other order exists."""
    lines = text.splitlines()
    if len(set(lines)) < 2:
        return None
    generator = random.Random(f"{seed}\0{text}")  # a str seed hashes with sha512: the same in every process
    order = lines[:]
    while order == lines:
        generator.shuffle(order)
    return "\n".join(order) + "\n"


def function_pairs(instructions: Dataset, seed: int = 0) -> Dataset:
    """Preference records from "complete this function" records: the real body is chosen over its lines shuffled."""
    rows = []
    for record in instructions:
        rejected = shuffled_lines(record["output"], seed)
        if rejected is not None:
            rows.append({"prompt": record["instruction"], "input": record["input"], "chosen": record["output"], "rejected": rejected})
    return Dataset.from_list(rows) if rows else Dataset.from_dict({field: [] for field in PAIR_FIELDS})


class PyPreferenceDataModule(PreferencePairs, PyInstructDataModule):
    """Preference pairs built offline from the stdlib, split by file like the ``py_instruct`` examples.

    The prompt is a ``py_instruct`` prompt (a function's signature and docstring: "complete the body");
    the chosen response is the function's real body, the rejected one the same lines in a shuffled order
    (seeded; bodies without two different lines are left out). Both responses hold the same tokens, so
    what separates them is order and structure, which a model can learn from scratch and a pretrained
    model already knows.

    Args as in :class:`~lomo_lightning.data.instructions.PyInstructDataModule` (``max_examples`` and
    ``max_val_examples`` limit the functions, before those without a second order are left out).
    """

    def load_records(self) -> DatasetDict:
        instructions = super().load_records()
        return DatasetDict({split: function_pairs(records, self.seed) for split, records in instructions.items()})


__all__ = [
    "JsonPreferenceDataModule",
    "PAIR_COLUMNS",
    "PAIR_FIELDS",
    "PreferenceCollator",
    "PreferencePairs",
    "PyPreferenceDataModule",
    "SIDES",
    "check_preference_records",
    "function_pairs",
    "shuffled_lines",
    "tokenize_pairs",
]
