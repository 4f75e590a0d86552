"""Preference pairs for DPO, in TRL's dataset formats: from local files, a ``datasets`` dataset, or built from the stdlib.

A record has ``chosen`` and ``rejected`` and, unless it is implicit, a ``prompt``, each either

- a plain string (TRL's *standard* format), used as it is: the prompt's text, then each response with the
  tokenizer's eos appended (as TRL does); an optional ``input`` field (Alpaca-style context) joins the
  prompt after a blank line; or
- a list of messages ``{"role", "content"}`` (TRL's *conversational* format: system prompt, several turns),
  rendered by the tokenizer's chat template, which also supplies the end of each response (its own
  end-of-turn tokens, e.g. ``<|im_end|>``), with the generation prompt after the prompt's turns.

Without a ``prompt`` (the *implicit prompt* format) the prompt is the longest shared beginning of chosen
and rejected (their shared messages, or the shared text), as TRL's ``extract_prompt`` takes it.

As in TRL's ``DPOTrainer``, the prompt and each response are tokenized *together*, and split where the
prompt's own tokens and the whole sequence's stop agreeing, so the tokens at the boundary are the ones the
model sees at inference. A row is ``(prompt + response)[:seq_len]``, labels -100 on the prompt (TRL's
``max_length`` with ``keep_start``); a pair whose prompt alone fills ``seq_len`` is dropped and counted.

A batch is an ordinary causal-LM batch of ``2 * pairs`` rows, the chosen responses first, then the
rejected ones in the same order, so that one forward serves both sides of every pair; with the
reference model's sequence log-probabilities attached (``reference_logps``, one per row), it is what
:class:`~lomo_lightning.objectives.DPOObjective` takes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from datasets import Dataset, DatasetDict, load_dataset
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lomo_lightning.data.cache import quiet_progress_bars
from lomo_lightning.data.formats import Messages, completion_row, tokenize_prompt_completions
from lomo_lightning.data.instructions import (
    InstructionCollator,
    InstructionDataModule,
    JsonInstructionDataModule,
    PyInstructDataModule,
    check_records,
    eos_token_id,
    format_prompt,
    map_tokenized,
    split_records,
)
from lomo_lightning.data.mutations import mutated_bodies, shuffled_lines
from lomo_lightning.objectives.dpo import REFERENCE_KEY

PAIR_FIELDS = ("prompt", "input", "chosen", "rejected")
SIDES = ("chosen", "rejected")
# A tokenized pair: both responses after the prompt, as causal-LM rows (then, once computed, its reference values)
PAIR_COLUMNS = tuple(f"{side}_{column}" for side in SIDES for column in ("input_ids", "labels"))
# How py_preference makes a rejected body from a chosen one
REJECTED_KINDS = ("mutation", "shuffled_lines")


def extract_prompt(chosen: str | Messages, rejected: str | Messages) -> tuple[str | Messages, str | Messages, str | Messages]:
    """``(prompt, chosen, rejected)`` of an implicit-prompt pair: the prompt is what both share from the start.

    Messages are shared whole; text is shared character by character, a space before the first
    difference going with the responses (TRL's ``extract_prompt``).
    """
    index = 0
    for index in range(min(len(chosen), len(rejected))):  # noqa: B007 (the loop variable is the result)
        if chosen[index] != rejected[index]:
            if chosen[index - 1] == " ":
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]


def check_preference_records(records: Dataset, source: str) -> Dataset:
    """Fail on an empty source or a record without ``chosen``/``rejected`` (or ``prompt``, where others have one);
    extract the prompt of implicit-prompt records; fill a missing ``input`` with ""."""
    if len(records) and "prompt" not in records.column_names and {"chosen", "rejected"} <= set(records.column_names):

        def split(record: dict) -> dict:
            prompt, chosen, rejected = extract_prompt(record["chosen"], record["rejected"])
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

        with quiet_progress_bars():
            records = records.map(split)
    return check_records(records, source, fields=PAIR_FIELDS, required=("prompt", "chosen", "rejected"))


def tokenize_pairs(records: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Tokenize preference records into ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels`` (:func:`~lomo_lightning.data.formats.tokenize_prompt_completions`, then cut to
    ``seq_len``), dropping the pairs whose prompt alone fills ``seq_len``."""
    eos_token_id(tokenizer)  # refuses a tokenizer without one

    def tokenize_together(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        columns: dict[str, list[list[int]]] = {column: [] for column in PAIR_COLUMNS}
        for prompt, input, chosen, rejected in zip(batch["prompt"], batch["input"], batch["chosen"], batch["rejected"]):
            prompt_ids, responses = tokenize_prompt_completions(tokenizer, prompt, (chosen, rejected), input)
            rows = [completion_row(prompt_ids, response, seq_len) for response in responses]
            for side, row in zip(SIDES, rows):
                if row is None:  # the prompt alone fills seq_len, for both sides alike (TRL drops these too)
                    break
                columns[f"{side}_input_ids"].append(row["input_ids"])
                columns[f"{side}_labels"].append(row["labels"])
        return columns

    return map_tokenized(records, tokenize_together, tokenizer, seq_len)


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
    """Preference pairs from local files of records in TRL's formats (see the module docstring).

    ``{"prompt", "chosen", "rejected"}`` as strings or as lists of messages, ``prompt`` optional (implicit),
    ``input`` optional (Alpaca-style context joined to a string prompt).

    Args:
        train_file: a ``.json`` (list of records or JSON lines), ``.jsonl`` or ``.parquet`` file.
        val_file: the same for validation; without it, ``val_fraction`` of ``train_file`` is held out
            (a seeded, deterministic split).
        Other arguments as in :class:`~lomo_lightning.data.instructions.InstructionDataModule`.
    """


def body_hash(body: str) -> str:
    """The identity of a function body for keeping held-out functions out of training: its text, whitespace aside."""
    return hashlib.sha256(" ".join(body.split()).encode()).hexdigest()


def function_pairs(instructions: Dataset, seed: int = 0, rejected: str = "mutation", mutations_per_function: int = 3) -> Dataset:
    """Preference records from "complete this function" records: the real body is chosen over a rejected one.

    ``rejected="mutation"`` (hard pairs): the body with one mutation that still parses
    (:func:`~lomo_lightning.data.mutations.mutated_bodies`), up to ``mutations_per_function`` pairs per
    function, each with another mutation. ``"shuffled_lines"`` (a smoke test): its lines shuffled, one pair.
    """
    if rejected not in REJECTED_KINDS:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED_KINDS)}, got {rejected!r}")
    rows = []
    for record in instructions:
        body = record["output"]
        if rejected == "mutation":
            mutants = [mutant for _, mutant in mutated_bodies(body, mutations_per_function, seed)]
        else:
            mutants = [m for m in (shuffled_lines(body, seed),) if m is not None]
        rows += [{"prompt": record["instruction"], "input": record["input"], "chosen": body, "rejected": m} for m in mutants]
    return Dataset.from_list(rows) if rows else Dataset.from_dict({field: [] for field in PAIR_FIELDS})


def instruction_conversations(records: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Pairs of instruction records (``prompt`` the instruction, ``input`` its context) in TRL's format for ``tokenizer``.

    As instruction tuning renders them (:func:`~lomo_lightning.data.instructions.render_prompt`): one user
    turn and assistant replies when the tokenizer has a chat template, else the Alpaca prompt as a string.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))

    def convert(record: dict) -> dict:
        if not chat:
            return {"prompt": format_prompt(record["prompt"], record["input"]), "input": ""}
        content = f"{record['prompt']}\n\n{record['input']}" if record["input"] else record["prompt"]
        return {
            "prompt": [{"role": "user", "content": content}],
            "input": "",
            **{side: [{"role": "assistant", "content": record[side]}] for side in SIDES},
        }

    with quiet_progress_bars():
        return records.map(convert)


class PyPreferenceDataModule(PreferencePairs, PyInstructDataModule):
    """Preference pairs built offline from the stdlib, split by file like the ``py_instruct`` examples.

    The prompt is a ``py_instruct`` prompt (a function's signature and docstring: "complete the body"),
    rendered as instruction tuning renders it (the chat template's user turn, or the Alpaca prompt); the
    chosen response is the function's real body. The rejected one is, by default, the same body with one
    mutation that still parses (a negated comparison, ``and``/``or``, an off-by-one constant, a dropped
    ``not``, swapped branches or arguments, a wrong returned name), several pairs per function, so that a
    model has to read the code to prefer the right one. Held-out functions come from held-out files, and
    a held-out function whose body (whitespace aside) also occurs in training is left out.

    Args:
        rejected: ``"mutation"`` (hard pairs) or ``"shuffled_lines"`` (the body's lines shuffled: easy pairs,
            mostly not valid Python; a smoke test).
        mutations_per_function: pairs per function with ``rejected="mutation"``.
        Other args as in :class:`~lomo_lightning.data.instructions.PyInstructDataModule` (``max_examples`` and
        ``max_val_examples`` limit the functions, before those without a mutation are left out).
    """

    def __init__(self, *args: Any, rejected: str = "mutation", mutations_per_function: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if rejected not in REJECTED_KINDS:
            raise ValueError(f"rejected must be one of {', '.join(REJECTED_KINDS)}, got {rejected!r}")
        self.rejected = rejected
        self.mutations_per_function = mutations_per_function

    def load_records(self) -> DatasetDict:
        instructions = super().load_records()
        trained = {body_hash(body) for body in instructions["train"]["output"]}
        with quiet_progress_bars():
            instructions["val"] = instructions["val"].filter(lambda record: body_hash(record["output"]) not in trained)
        return DatasetDict(
            {
                split: function_pairs(records, self.seed, self.rejected, self.mutations_per_function)
                for split, records in instructions.items()
            }
        )

    def tokenize(self, records: Dataset) -> Dataset:
        return tokenize_pairs(instruction_conversations(records, self.tokenizer), self.tokenizer, self.seq_len)


class HFPreferenceDataModule(PreferencePairs, InstructionDataModule):
    """Preference pairs from any ``datasets`` dataset (a hub name or a local path), in TRL's formats.

    Args:
        name: passed to ``datasets.load_dataset`` (hub name, local directory, or a builder such as ``json``
            with ``data_files``).
        config: the dataset configuration, if it has several.
        split: the split to train on.
        val_split: the split to validate on; without it, ``val_fraction`` of ``split`` is held out.
        data_files: passed to ``datasets.load_dataset`` (for a builder name such as ``json``).
        Other arguments as in :class:`~lomo_lightning.data.instructions.InstructionDataModule`.
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        data_files: Any = None,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        seq_len: int = 512,
        batch_size: int = 4,
        vocab_size: int = 8192,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, vocab_size, num_workers, cache_dir, seed)
        self.name = name
        self.config = config
        self.split_name = split
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.data_files = data_files

    def _read(self, split: str) -> Dataset:
        with quiet_progress_bars():
            records = load_dataset(
                self.name, self.config, split=split, data_files=self.data_files, cache_dir=str(self.cache_dir / "hf")
            )
        return check_preference_records(cast(Dataset, records), f"{self.name}[{split}]")

    def load_records(self) -> DatasetDict:
        train = self._read(self.split_name)
        if self.val_split is None:
            return split_records(train, self.val_fraction, self.seed)
        return DatasetDict(train=train, val=self._read(self.val_split))


__all__ = [
    "HFPreferenceDataModule",
    "JsonPreferenceDataModule",
    "PAIR_COLUMNS",
    "PAIR_FIELDS",
    "PreferenceCollator",
    "PreferencePairs",
    "PyPreferenceDataModule",
    "REJECTED_KINDS",
    "SIDES",
    "body_hash",
    "check_preference_records",
    "extract_prompt",
    "function_pairs",
    "instruction_conversations",
    "shuffled_lines",
    "tokenize_pairs",
]
