"""Preference pairs: prompts rendered and masked as for instruction tuning, both responses after the same prompt,
chosen rows then rejected rows in a batch; the stdlib pairs split by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lomo_lightning.data import (
    IGNORE_INDEX,
    JsonPreferenceDataModule,
    PreferenceCollator,
    PyInstructDataModule,
    PyPreferenceDataModule,
    load_tokenizer,
    render_prompt,
)
from lomo_lightning.data.instructions import PY_INSTRUCTION
from lomo_lightning.data.preferences import shuffled_lines

MAX_FILES = 40
VOCAB = 512
PAIRS = [
    {"prompt": "Add the numbers.", "input": "2 3", "chosen": "5", "rejected": "23"},
    {"prompt": "Say hello.", "chosen": "hello world", "rejected": "goodbye"},
    {"prompt": "Repeat the word.", "chosen": "spam " * 60, "rejected": "eggs"},
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lomo_cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path):
    return load_tokenizer(vocab_size=VOCAB, max_files=MAX_FILES, cache_dir=cache_dir)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_both_responses_follow_the_same_masked_prompt_and_end_with_eos(tmp_path, cache_dir, tokenizer):
    seq_len = 160
    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dm = JsonPreferenceDataModule(train, train, tokenizer=tokenizer, seq_len=seq_len, cache_dir=cache_dir)
    dm.setup("fit")
    assert len(dm.train_dataset) == len(PAIRS)
    for record, row in zip(PAIRS, dm.train_dataset):
        prompt = tokenizer(render_prompt(tokenizer, record["prompt"], record.get("input")), add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            input_ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert input_ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
            assert labels[len(prompt) :] == input_ids[len(prompt) :]
            response = tokenizer.decode(input_ids[len(prompt) :])
            full = record[side] + tokenizer.eos_token
            assert response == full if len(input_ids) < seq_len else full.startswith(response)
    assert len(dm.train_dataset[2]["chosen_input_ids"]) == seq_len, "a long response is truncated, not dropped"


def test_a_batch_holds_the_chosen_rows_then_the_rejected_rows_with_their_reference_values():
    pairs = [
        {"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7], "rejected_input_ids": [5, 8], "rejected_labels": [-100, 8],
         "reference_logps": [-1.5, -2.5]},
        {"chosen_input_ids": [9, 10], "chosen_labels": [-100, 10], "rejected_input_ids": [9, 11, 12, 13], "rejected_labels": [-100, 11, 12, 13],
         "reference_logps": [-3.5, -4.5]},
    ]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 10, 0, 0], [5, 8, 0, 0], [9, 11, 12, 13]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 10, -100, -100], [-100, 8, -100, -100], [-100, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["reference_logps"].tolist() == [-1.5, -3.5, -2.5, -4.5]
    assert batch["reference_logps"].dtype == torch.float32


@pytest.mark.parametrize(
    ("records", "error", "message"),
    [
        (None, FileNotFoundError, "preference file not found"),
        ([{"prompt": "a", "chosen": "b"}], ValueError, r"record 0 .* 'rejected' field"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"chosen": "b", "rejected": "c"}], ValueError, r"record 1 .* 'prompt' field"),
    ],
)
def test_bad_preference_files_fail_clearly(tmp_path, cache_dir, tokenizer, records, error, message):
    path = tmp_path / "pairs.jsonl"
    if records is not None:
        write_jsonl(path, records)
    dm = JsonPreferenceDataModule(path, path, tokenizer=tokenizer, cache_dir=cache_dir)
    with pytest.raises(error, match=message):
        dm.setup("fit")


def test_stdlib_pairs_prefer_each_real_body_over_its_lines_shuffled_and_split_by_file(cache_dir, tokenizer):
    options = dict(max_files=MAX_FILES, val_fraction=0.2, cache_dir=cache_dir, seq_len=256)
    pairs = PyPreferenceDataModule(tokenizer, **options)
    records = pairs.load_records()
    instructions = PyInstructDataModule(tokenizer, **options).load_records()
    for split in ("train", "val"):
        bodies = set(zip(instructions[split]["input"], instructions[split]["output"]))
        assert records[split].num_rows > 0
        for record in records[split]:
            assert record["prompt"] == PY_INSTRUCTION and (record["input"], record["chosen"]) in bodies
            assert record["rejected"] != record["chosen"]
            assert sorted(record["rejected"].splitlines()) == sorted(record["chosen"].splitlines())
    assert not set(records["train"]["input"]) & set(records["val"]["input"]), "held-out functions come from held-out files"
    pairs.setup("fit")
    assert 0 < len(pairs.val_dataset) <= records["val"].num_rows


def test_shuffled_lines_are_seeded_and_need_two_different_lines():
    body = "a = 1\nb = 2\nreturn a + b\n"
    assert shuffled_lines(body, seed=0) == shuffled_lines(body, seed=0) != body
    assert shuffled_lines("return 1\n") is None and shuffled_lines("pass\npass\n") is None
