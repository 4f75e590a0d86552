"""Instruction tuning: Alpaca-style prompts, loss on the response only, and three sources of examples.

Every source yields records with ``instruction``, ``input`` (may be empty) and ``output``. The prompt is
rendered with the tokenizer's chat template when it has one (one user turn, then the generation prompt:
what a chat model saw in its own instruction tuning), else with the Alpaca template. An example is
tokenized as ``prompt_ids + response_ids + eos``; labels are ``-100`` on the prompt (and on padding), so
the model is only trained to produce the response. Prompt and response are tokenized separately, so
the boundary between them is exact.

Local files and ``datasets`` datasets may also hold TRL's SFT formats (:mod:`lomo_lightning.data.formats`):
*prompt-completion* records ``{"prompt", "completion"}`` (strings, or lists of messages for the chat
template), tokenized together and split where the prompt's tokens part from the whole sequence's, with
labels on the completion only; and *conversational language modeling* records ``{"messages"}`` (a whole
conversation, system prompt and several turns, rendered by the chat template), with labels on every token,
as TRL's ``SFTTrainer`` has them by default.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lomo_lightning._compat import dataset_fingerprint
from lomo_lightning.data.base import TokenizedDataModule
from lomo_lightning.data.cache import cache_key, cached_dataset_dict, quiet_progress_bars
from lomo_lightning.data.formats import completion_row, conversation_ids, tokenize_prompt_completions
from lomo_lightning.data.stdlib import relative_key, split_files, stdlib_source_files
from lomo_lightning.data.tokenizer import tokenizer_fingerprint
from lomo_lightning.labels import IGNORE_INDEX

FIELDS = ("instruction", "input", "output")
# TRL's SFT formats, by the columns that name them: prompt-completion, conversational language modeling
TRL_FORMATS = (("prompt", "completion"), ("messages",))
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PY_INSTRUCTION = "Complete the body of this Python function."


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for ``instruction`` (and ``input`` when non-empty), ending where the response starts."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_WITHOUT_INPUT.format(instruction=instruction)


def format_example(instruction: str, input: str | None, output: str) -> str:
    """The full Alpaca text of one example: its prompt followed by the response ``output``."""
    return format_prompt(instruction, input) + output


def render_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, input: str | None = None) -> str:
    """The prompt text for ``tokenizer``: its chat template when it has one, else :func:`format_prompt`.

    With a chat template the instruction (and the input, after a blank line) is one user turn, followed
    by the template's generation prompt (e.g. ``<|im_start|>assistant\n``), so the response starts where
    the model's own chat responses start. Its end of turn is the tokenizer's eos token.
    """
    if getattr(tokenizer, "chat_template", None):
        content = f"{instruction}\n\n{input}" if input else instruction
        messages = [{"role": "user", "content": content}]
        return cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return format_prompt(instruction, input)


def tokenize_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, seq_len: int) -> dict | None:
    """``input_ids`` and ``labels`` for one example, or ``None`` when the prompt leaves no room for the response.

    Truncation only shortens the response (and may cut its eos); the prompt is never cut, because a
    response to half a prompt teaches the wrong thing.
    """
    if len(prompt_ids) >= seq_len:
        return None
    response = (response_ids + [eos_id])[: seq_len - len(prompt_ids)]
    return {"input_ids": prompt_ids + response, "labels": [IGNORE_INDEX] * len(prompt_ids) + response}


def tokenize_examples(records: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Tokenize a dataset of instruction records (Alpaca-style, or one of TRL's :data:`TRL_FORMATS`), dropping
    those whose prompt alone fills ``seq_len``."""
    eos = eos_token_id(tokenizer)
    if "messages" in records.column_names:

        def tokenize_conversations(batch: dict[str, list]) -> dict[str, list[list[int]]]:
            rows = [conversation_ids(tokenizer, messages)[:seq_len] for messages in batch["messages"]]
            return {"input_ids": rows, "labels": [list(row) for row in rows]}

        return map_tokenized(records, tokenize_conversations, tokenizer, seq_len)
    if "completion" in records.column_names:

        def tokenize_prompt_completion(batch: dict[str, list]) -> dict[str, list[list[int]]]:
            rows = []
            for prompt, completion in zip(batch["prompt"], batch["completion"]):
                prompt_ids, (completion_ids,) = tokenize_prompt_completions(tokenizer, prompt, [completion])
                rows.append(completion_row(prompt_ids, completion_ids, seq_len))
            kept = [row for row in rows if row is not None]
            return {"input_ids": [row["input_ids"] for row in kept], "labels": [row["labels"] for row in kept]}

        return map_tokenized(records, tokenize_prompt_completion, tokenizer, seq_len)

    def tokenize(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        prompt_ids = tokenize_prompts(tokenizer, batch["instruction"], batch["input"])
        response_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        examples = [tokenize_example(p, r, eos, seq_len) for p, r in zip(prompt_ids, response_ids)]
        kept = [example for example in examples if example is not None]
        return {"input_ids": [e["input_ids"] for e in kept], "labels": [e["labels"] for e in kept]}

    return map_tokenized(records, tokenize, tokenizer, seq_len)


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that ends every response; a tokenizer without one is refused."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token: responses cannot be terminated")
    return tokenizer.eos_token_id


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, instructions: list[str], inputs: list[str]) -> list[list[int]]:
    """The token ids of each rendered prompt (:func:`render_prompt`), without special tokens added."""
    prompts = [render_prompt(tokenizer, instruction, input) for instruction, input in zip(instructions, inputs)]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def map_tokenized(
    records: Dataset, tokenize: Callable[[dict[str, list]], dict[str, list]], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> Dataset:
    """``records.map(tokenize, batched=True)`` into new columns, cached under a name that says what it depends on."""
    # Name the result after everything it depends on, so datasets' own map cache can never mix tokenizers.
    fingerprint = cache_key(
        records=dataset_fingerprint(records),
        tokenize=tokenize.__qualname__,
        tokenizer=tokenizer_fingerprint(tokenizer),
        seq_len=seq_len,
    )
    with quiet_progress_bars():
        return records.map(tokenize, batched=True, remove_columns=records.column_names, new_fingerprint=fingerprint)


@dataclass
class InstructionCollator:
    """Right-pads a list of tokenized examples to the longest one: pad id, attention 0, labels -100."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        length = max(len(row["input_ids"]) for row in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(features):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def check_records(
    records: Dataset, source: str, fields: tuple[str, ...] = FIELDS, required: tuple[str, ...] = ("instruction", "output")
) -> Dataset:
    """Fail on an empty source or a record without a ``required`` field; fill a missing ``input`` with "".

    Returns the records with exactly ``fields`` as columns (the defaults: instruction records).
    """
    if len(records) == 0:
        raise ValueError(f"{source} has no records: it must hold {'/'.join(fields)} examples")
    for field in required:
        values = records[field] if field in records.column_names else [None]
        missing = next((index for index, value in enumerate(values) if value is None), None)
        if missing is not None:
            raise ValueError(f"record {missing} of {source} has no {field!r} field: every record needs one")
    if "input" not in records.column_names:
        records = records.add_column("input", [""] * len(records))
    with quiet_progress_bars():
        records = records.map(lambda row: {"input": row["input"] or ""})
    return records.select_columns(list(fields))


def check_instruction_records(records: Dataset, source: str) -> Dataset:
    """:func:`check_records` for Alpaca-style records; for TRL's formats (:data:`TRL_FORMATS`, told by their
    columns) the same checks on their own fields, which are kept as they are."""
    for fields in TRL_FORMATS:
        if set(fields) <= set(records.column_names):
            if len(records) == 0:
                raise ValueError(f"{source} has no records: it must hold {'/'.join(fields)} examples")
            for field in fields:
                missing = next((index for index, value in enumerate(records[field]) if value is None), None)
                if missing is not None:
                    raise ValueError(f"record {missing} of {source} has no {field!r} field: every record needs one")
            return records.select_columns(list(fields))
    return check_records(records, source)


def split_records(records: Dataset, val_fraction: float, seed: int) -> DatasetDict:
    """A deterministic ``train``/``val`` split of ``records`` with at least one val record (when there are two)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) without a val file, got {val_fraction}")
    if len(records) < 2:
        raise ValueError(f"cannot hold out validation from {len(records)} record: pass a val file or more records")
    n_val = max(1, round(len(records) * val_fraction))
    split = records.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return DatasetDict(train=split["train"], val=split["test"])


class InstructionDataModule(TokenizedDataModule):
    """Base of the instruction data modules: subclasses only provide the raw ``train``/``val`` records.

    After ``setup``, ``num_dropped`` maps each split to the number of examples dropped because their
    prompt alone filled ``seq_len``.
    """

    # what a record is: the word for it in errors, its check, and the collator of its tokenized form
    record_kind = "instruction"
    check_records: Callable[[Dataset, str], Dataset] = staticmethod(check_instruction_records)
    collator_class: Callable[[int], Callable[[list[dict]], dict[str, Tensor]]] = InstructionCollator

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
        vocab_size: int = 8192,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            vocab_size=vocab_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
            seed=seed,
        )
        self.num_dropped: dict[str, int] = {}

    @abstractmethod
    def load_records(self) -> DatasetDict:
        """The raw ``train`` and ``val`` records, with string columns ``instruction``, ``input``, ``output``."""

    def prepare_data(self) -> None:
        """Build the tokenizer (training the stdlib BPE once if needed)."""
        self.build_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        """Load, check and tokenize the records of both splits."""
        records = self.load_records()
        for split in ("train", "val"):
            if len(records[split]) == 0:
                name = type(self).__name__
                raise ValueError(f"{name} has no {split} examples: use more data or a larger val_fraction")
            tokenized = self.tokenize(records[split])
            self.num_dropped[split] = len(records[split]) - len(tokenized)
            if self.num_dropped[split]:
                rank_zero_warn(
                    f"dropped {self.num_dropped[split]} of {len(records[split])} {split} examples whose prompt "
                    f"alone fills seq_len={self.seq_len}"
                )
            if len(tokenized) == 0:
                raise ValueError(f"no {split} example fits in seq_len={self.seq_len}: raise seq_len")
            setattr(self, f"{split}_dataset", tokenized)

    def tokenize(self, records: Dataset) -> Dataset:
        """The tokenized examples of one split's records (:func:`tokenize_examples`)."""
        return tokenize_examples(records, self.tokenizer, self.seq_len)

    def collator(self) -> Callable[[list[dict]], dict[str, Tensor]]:
        pad = self.tokenizer.pad_token_id
        return self.collator_class(self.tokenizer.eos_token_id if pad is None else pad)


def function_examples(path: Path) -> list[dict[str, str]]:
    """Instruction records from the documented functions of one source file.

    For each function or method with a docstring followed by 1 to 40 lines of body: input = the
    signature and docstring, output = the rest of the body; both dedented to column zero.
    """
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    examples = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        docstring_end = node.body[0].end_lineno
        assert docstring_end is not None  # ast.parse sets the positions
        if len(node.body) < 2 or node.body[1].lineno <= docstring_end or docstring_end == node.lineno:
            continue
        body = textwrap.dedent("\n".join(lines[docstring_end : node.end_lineno])).strip("\n")
        if not 1 <= len(body.splitlines()) <= 40:
            continue
        header = textwrap.dedent("\n".join(lines[node.lineno - 1 : docstring_end]))
        examples.append({"instruction": PY_INSTRUCTION, "input": header, "output": body + "\n"})
    return examples


class PyInstructDataModule(InstructionDataModule):
    """"Complete this function" pairs extracted with ``ast`` from the stdlib, split by file like the corpus.

    Args:
        max_files: use a deterministic sample of this many stdlib files.
        max_examples: keep at most this many train examples (a seeded random subset).
        max_val_examples: keep at most this many val examples (a seeded random subset).
        val_fraction: share of files held out, with the same stable split as :class:`PythonStdlibDataModule`.
        Other arguments as in :class:`InstructionDataModule`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
        vocab_size: int = 8192,
        val_fraction: float = 0.05,
        max_files: int | None = None,
        max_examples: int | None = None,
        max_val_examples: int | None = None,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, vocab_size, num_workers, cache_dir, seed)
        self.val_fraction = val_fraction
        self.max_files = max_files
        self.max_examples = max_examples
        self.max_val_examples = max_val_examples

    def split(self) -> tuple[list[Path], list[Path]]:
        """The ``(train, val)`` stdlib files the examples come from."""
        return split_files(stdlib_source_files(self.max_files), self.val_fraction, self.seed)

    def prepare_data(self) -> None:
        """Build the tokenizer and extract the examples once, filling the disk cache."""
        super().prepare_data()
        self.load_records()

    def load_records(self) -> DatasetDict:
        key = cache_key(
            kind="py-instruct",
            python=sys.version,
            val_fraction=self.val_fraction,
            max_files=self.max_files,
            seed=self.seed,
        )
        records = cached_dataset_dict(self.cache_dir / "datasets" / f"py-instruct-{key}", self._extract)
        limits = {"train": self.max_examples, "val": self.max_val_examples}
        for split, limit in limits.items():
            if limit is not None and limit < len(records[split]):
                records[split] = records[split].shuffle(seed=self.seed).select(range(limit))
        return records

    def _extract(self) -> DatasetDict:
        splits = {}
        for split, files in zip(("train", "val"), self.split()):
            rows = [dict(example, file=relative_key(path)) for path in files for example in function_examples(path)]
            splits[split] = Dataset.from_list(rows) if rows else Dataset.from_dict({f: [] for f in (*FIELDS, "file")})
        rank_zero_info(f"Extracted {len(splits['train'])} train and {len(splits['val'])} val function examples")
        return DatasetDict(splits)


def read_records(
    path: str | os.PathLike,
    cache_dir: Path,
    check: Callable[[Dataset, str], Dataset] = check_records,
    kind: str = "instruction",
) -> Dataset:
    """Records from a local ``.json`` (list or lines), ``.jsonl`` or ``.parquet`` file, checked by ``check``.

    ``kind`` names the records in errors: instruction records by default.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}: check train_file/val_file")
    if path.suffix not in (".json", ".jsonl", ".parquet"):
        raise ValueError(f"unsupported {kind} file {path}: use .json, .jsonl or .parquet")
    if path.stat().st_size == 0 or (path.suffix != ".parquet" and not check_json_records(path)):
        raise ValueError(f"{kind} file {path} is empty: it must hold {kind} records")
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        with quiet_progress_bars():
            records = load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir / "hf"))
    except DatasetGenerationError:
        raise ValueError(f"{path} cannot be read as {builder}{json_error(path) if builder == 'json' else ''}") from None
    return check(records, str(path))


MAX_RECORD_BYTES = 16 * 2**20  # one JSON line; a record of instruction data is text, far below this
MAX_DOCUMENT_BYTES = 2**30  # a .json list is parsed whole: beyond this, use JSON lines
MAX_NESTING = 32  # records are flat: deeper nesting is malformed or hostile (parsers recurse on it)


def check_json_records(path: Path) -> int:
    """Parse ``path`` (a JSON list or JSON lines) with the stdlib, record by record; the number of records.

    Only a file this accepts reaches ``datasets``, whose JSON reader falls back to parsers that crash
    (a segmentation fault) on input the stdlib rejects. Raises ``ValueError`` naming the line for a record
    that is malformed, nested deeper than :data:`MAX_NESTING` levels (a ``RecursionError`` in a parser)
    or larger than :data:`MAX_RECORD_BYTES`.
    """
    with open(path, "rb") as file:
        start = file.read(4096).lstrip()
    if start.startswith(b"["):
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise ValueError(f"{path} is a {size / 2**30:.1f} GiB JSON list: write it as JSON lines (.jsonl), one record a line")
        records = _parsed(path.read_bytes(), path, 1)
        return len(records) if isinstance(records, list) else 1
    count = 0
    with open(path, "rb") as file:
        for number, line in enumerate(iter(lambda: file.readline(MAX_RECORD_BYTES + 1), b""), start=1):
            if len(line) > MAX_RECORD_BYTES:
                raise ValueError(f"{path} cannot be read as json: line {number} is over {MAX_RECORD_BYTES // 2**20} MiB: records are capped there")
            if line.strip():
                _parsed(line.rstrip(b"\r\n"), path, number)  # one record a line: the line is the place
                count += 1
    return count


def _parsed(text: bytes, path: Path, line: int) -> Any:
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{path} cannot be read as json: line {line}: nested too deeply: fix or remove that record") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = line + (error.lineno - 1 if isinstance(error, json.JSONDecodeError) else 0)
        message = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise ValueError(f"{path} cannot be read as json: line {where}: {message}: fix or remove that record") from None
    if _depth(value) > MAX_NESTING:
        raise ValueError(
            f"{path} cannot be read as json: line {line}: nested deeper than {MAX_NESTING} levels: fix or remove that record"
        )
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a hostile value can be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_NESTING + 1:
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def json_error(path: Path) -> str:
    """Where ``path`` (a JSON document or JSON lines) stops being valid JSON, as ``": line N: message"``."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f": line {error.lineno}: {error.msg}: fix or remove that record"
        return ""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f": line {number}: {error.msg}: fix or remove that record"
    return ""


class JsonInstructionDataModule(InstructionDataModule):
    """Instruction tuning on local files of ``{"instruction", "input" (optional), "output"}`` records.

    Args:
        train_file: a ``.json`` (list of records or JSON lines), ``.jsonl`` or ``.parquet`` file.
        val_file: the same for validation; without it, ``val_fraction`` of ``train_file`` is held out
            (a seeded, deterministic split).
        Other arguments as in :class:`InstructionDataModule`.
    """

    def __init__(
        self,
        train_file: str | os.PathLike,
        val_file: str | os.PathLike | None = None,
        val_fraction: float = 0.05,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
        vocab_size: int = 8192,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, vocab_size, num_workers, cache_dir, seed)
        self.train_file = Path(train_file)
        self.val_file = None if val_file is None else Path(val_file)
        self.val_fraction = val_fraction

    def load_records(self) -> DatasetDict:
        train = self._read(self.train_file)
        if self.val_file is None:
            return split_records(train, self.val_fraction, self.seed)
        return DatasetDict(train=train, val=self._read(self.val_file))

    def _read(self, path: Path) -> Dataset:
        return read_records(path, self.cache_dir, self.check_records, self.record_kind)


class HFInstructionDataModule(InstructionDataModule):
    """Instruction tuning on any ``datasets`` dataset (hub name or local path), with its fields mapped.

    A dataset in one of TRL's SFT formats (:data:`TRL_FORMATS`) without the mapped columns is taken as it is.

    Args:
        name: passed to ``datasets.load_dataset`` (hub name, local directory or builder).
        config: the dataset configuration, if it has several.
        split: the split to train on.
        val_split: the split to validate on; without it, ``val_fraction`` of ``split`` is held out.
        instruction_field, input_field, output_field: the dataset's column names for the three fields
            (``input_field=None`` or a missing input column means no input).
        Other arguments as in :class:`InstructionDataModule`.
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        instruction_field: str = "instruction",
        input_field: str | None = "input",
        output_field: str = "output",
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
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
        self.fields = {"instruction": instruction_field, "input": input_field, "output": output_field}

    def _read(self, split: str) -> Dataset:
        source = f"{self.name}[{split}]"
        with quiet_progress_bars():
            records = load_dataset(self.name, self.config, split=split, cache_dir=str(self.cache_dir / "hf"))
        mapped = {self.fields["instruction"], self.fields["output"]} <= set(records.column_names)
        if not mapped and any(set(fields) <= set(records.column_names) for fields in TRL_FORMATS):
            return check_instruction_records(records, source)  # TRL's own format: its fields need no mapping
        for field in ("instruction", "output"):
            if self.fields[field] not in records.column_names:
                raise ValueError(
                    f"{source} has no column {self.fields[field]!r} (columns: {records.column_names}): "
                    f"pass {field}_field=<column>"
                )
        columns = {self.fields[f]: f for f in FIELDS if self.fields[f] in records.column_names}
        records = records.select_columns(list(columns)).rename_columns(
            {old: new for old, new in columns.items() if old != new}
        )
        return check_records(records, source)

    def load_records(self) -> DatasetDict:
        train = self._read(self.split_name)
        if self.val_split is None:
            return split_records(train, self.val_fraction, self.seed)
        return DatasetDict(train=train, val=self._read(self.val_split))


__all__ = [
    "FIELDS",
    "HFInstructionDataModule",
    "IGNORE_INDEX",
    "InstructionCollator",
    "InstructionDataModule",
    "JsonInstructionDataModule",
    "PY_INSTRUCTION",
    "PyInstructDataModule",
    "TRL_FORMATS",
    "check_instruction_records",
    "check_records",
    "eos_token_id",
    "format_example",
    "format_prompt",
    "function_examples",
    "map_tokenized",
    "read_records",
    "render_prompt",
    "split_records",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_prompts",
]
