"""Instruction data in TRL's SFT formats (prompt-completion, conversational language modeling): tokenized as TRL's
SFTTrainer tokenizes them, checked against its own code; through data=jsonl files and data=hf (load_dataset)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset
from test_preference_data import CHATML, MAX_FILES, VOCAB, assistant, user

from lomo_lightning.data import HFInstructionDataModule, JsonInstructionDataModule, load_tokenizer

FORMATS = {
    "prompt_completion": [
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    ],
    "conversational_prompt_completion": [
        {"prompt": [user("What color is the sky?")], "completion": [assistant("It is blue.")]},
        {"prompt": [{"role": "system", "content": "Be brief."}, user("2 + 2?")], "completion": [assistant("4")]},
    ],
    "messages": [
        {"messages": [user("Hi."), assistant("Hello."), user("2 + 2?"), assistant("4")]},
        {"messages": [{"role": "system", "content": "Be brief."}, user("Capital of France?"), assistant("Paris.")]},
    ],
}


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = load_tokenizer(vocab_size=VOCAB, max_files=MAX_FILES, cache_dir=tmp_path_factory.mktemp("cache"))
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML
    return chat


def trl_rows(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """TRL's SFTTrainer._prepare_dataset (completion-only loss, keep-start truncation) on the same records."""
    trl_sft = pytest.importorskip("trl.trainer.sft_trainer", reason="TRL is in the dev extra")
    args = SimpleNamespace(
        dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start", dataset_text_field="text",
        assistant_only_loss=False, shuffle_dataset=False,
    )
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True)
    dataset = trl_sft.SFTTrainer._prepare_dataset(trainer, Dataset.from_list(records), tokenizer, args, False, None, "train")
    return [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in dataset]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", list(FORMATS))
def test_each_trl_sft_format_is_tokenized_as_trls_sft_trainer_tokenizes_it(tmp_path, chat_tokenizer, kind):
    records = FORMATS[kind]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = JsonInstructionDataModule(train, train, tokenizer=chat_tokenizer, seq_len=160, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    ours = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in dm.train_dataset]
    assert ours == trl_rows(records, chat_tokenizer, 160)
    if kind != "messages":
        assert all(-100 in row["labels"] and row["labels"][-1] != -100 for row in ours), "loss on the completion only"


def test_a_prompt_that_fills_seq_len_is_dropped_and_counted(tmp_path, chat_tokenizer):
    records = [*FORMATS["prompt_completion"], {"prompt": "a long prompt " * 40, "completion": " x"}]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    dm = JsonInstructionDataModule(train, train, tokenizer=chat_tokenizer, seq_len=24, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and dm.num_dropped["train"] == 1
    assert len(trl_rows(records, chat_tokenizer, 24)) == 2, "TRL drops the same example"


def test_data_hf_takes_a_trl_formatted_dataset_through_load_dataset_offline(tmp_path, chat_tokenizer):
    directory = tmp_path / "sft"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", FORMATS["messages"] * 3)
    write_jsonl(directory / "test.jsonl", FORMATS["messages"])
    dm = HFInstructionDataModule(str(directory), val_split="test", tokenizer=chat_tokenizer, seq_len=160, cache_dir=tmp_path / "cache")
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and dm.val_dataset[1]["input_ids"] == trl_rows(FORMATS["messages"], chat_tokenizer, 160)[1]["input_ids"]
