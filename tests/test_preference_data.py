"""Preference pairs in TRL's formats, tokenized as TRL's DPOTrainer tokenizes them (checked against its own code);
chosen rows then rejected rows in a batch; the stdlib pairs are hard (one mutation that parses), split by file."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from lomo_lightning.data import (
    IGNORE_INDEX,
    HFPreferenceDataModule,
    JsonPreferenceDataModule,
    PreferenceCollator,
    PyInstructDataModule,
    PyPreferenceDataModule,
    load_tokenizer,
)
from lomo_lightning.data.instructions import PY_INSTRUCTION
from lomo_lightning.data.mutations import mutated_bodies, shuffled_lines
from lomo_lightning.data.preferences import body_hash, extract_prompt, instruction_conversations

MAX_FILES = 40
VOCAB = 512
PAIRS = [
    {"prompt": "Add the numbers.", "input": "2 3", "chosen": "5", "rejected": "23"},
    {"prompt": "Say hello.", "chosen": "hello world", "rejected": "goodbye"},
    {"prompt": "Repeat the word.", "chosen": "spam " * 150, "rejected": "eggs"},
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


# SmolLM2's chat template (ChatML with a default system prompt), given to the stdlib tokenizer for fast tests
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


FORMATS = {
    "standard": [
        {"prompt": "Add the numbers 2 and 3.", "chosen": " 5", "rejected": " 23"},
        {"prompt": "Say hello.", "chosen": "hello world", "rejected": "goodbye"},
        {"prompt": "Repeat the word.", "chosen": "spam " * 150, "rejected": "eggs"},
    ],
    "implicit_standard": [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "def f(x):\n    return x + 1\n", "rejected": "def f(x):\n    return x - 1\n"},
    ],
    "conversational": [
        {"prompt": [user("What color is the sky?")], "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
        {"prompt": [user("Where is the sun?")], "chosen": [assistant("In the sky.")], "rejected": [assistant("In the sea.")]},
    ],
    "multi_turn_system": [
        {
            "prompt": [{"role": "system", "content": "Answer briefly."}, user("Hi."), assistant("Hello."), user("2 + 2?")],
            "chosen": [assistant("4")],
            "rejected": [assistant("22")],
        },
        {"prompt": [user("Name a prime.")], "chosen": [assistant("7")], "rejected": [assistant("8")]},
    ],
    "implicit_conversational": [
        {"chosen": [user("Capital of France?"), assistant("Paris.")], "rejected": [user("Capital of France?"), assistant("Lyon.")]},
        {"chosen": [user("1 + 1?"), assistant("2")], "rejected": [user("1 + 1?"), assistant("3")]},
    ],
}


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML
    return chat


def trl_rows(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """TRL's DPOTrainer._prepare_dataset and its collator's keep-start truncation, on the same records."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is in the dev extra")
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    dataset = trl_dpo.DPOTrainer._prepare_dataset(trainer, Dataset.from_list(records), tokenizer, args, "train")
    return [
        {"prompt": len(row["prompt_ids"]), **{side: (row["prompt_ids"] + row[f"{side}_ids"])[:max_length] for side in ("chosen", "rejected")}}
        for row in dataset
    ]


@pytest.mark.parametrize("kind", list(FORMATS))
def test_each_trl_format_is_tokenized_as_trls_dpo_trainer_tokenizes_it(tmp_path, cache_dir, chat_tokenizer, kind):
    """Prompt and response tokenized together and split where they part; the chat template's end of turn, or eos."""
    seq_len = 192
    records = FORMATS[kind]
    train = write_jsonl(tmp_path / "pairs.jsonl", records)
    dm = JsonPreferenceDataModule(train, train, tokenizer=chat_tokenizer, seq_len=seq_len, cache_dir=cache_dir)
    dm.setup("fit")
    expected = trl_rows(records, chat_tokenizer, seq_len)
    assert len(dm.train_dataset) == len(expected) == len(records)
    for row, theirs in zip(dm.train_dataset, expected):
        for side in ("chosen", "rejected"):
            assert row[f"{side}_input_ids"] == theirs[side]
            assert row[f"{side}_labels"] == [IGNORE_INDEX] * theirs["prompt"] + theirs[side][theirs["prompt"] :]
    chosen = chat_tokenizer.decode(dm.train_dataset[0]["chosen_input_ids"])
    end = "<|im_end|>\n" if "conversational" in kind or "multi" in kind else chat_tokenizer.eos_token
    assert chosen.endswith(end), "the template's end of turn for conversations, eos for plain strings"
    if kind == "standard":
        assert len(dm.train_dataset[2]["chosen_input_ids"]) == seq_len, "a long response is truncated, not dropped"


def test_a_pair_whose_prompt_alone_fills_max_length_is_dropped_and_counted(tmp_path, cache_dir, tokenizer):
    records = [*FORMATS["standard"][:2], {"prompt": "a long prompt " * 40, "chosen": "x", "rejected": "y"}]
    train = write_jsonl(tmp_path / "pairs.jsonl", records)
    dm = JsonPreferenceDataModule(train, train, tokenizer=tokenizer, seq_len=32, cache_dir=cache_dir)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and dm.num_dropped == {"train": 1, "val": 1}
    assert len(trl_rows(records, tokenizer, 32)) == 2, "TRL drops the same pair"


def test_implicit_prompts_are_extracted_as_trls_extract_prompt_does():
    trl_data = pytest.importorskip("trl.data_utils", reason="TRL is in the dev extra")
    for record in FORMATS["implicit_standard"] + FORMATS["implicit_conversational"]:
        theirs = trl_data.extract_prompt(record)
        assert extract_prompt(record["chosen"], record["rejected"]) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


@pytest.mark.parametrize("source", ["json_builder", "directory"])
def test_hf_preference_takes_a_dataset_through_load_dataset_offline(tmp_path, cache_dir, chat_tokenizer, source):
    records = FORMATS["conversational"] * 3
    directory = tmp_path / "pairs"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", records)
    write_jsonl(directory / "test.jsonl", FORMATS["multi_turn_system"])
    options = {"name": "json", "data_files": {"train": str(directory / "train.jsonl"), "test": str(directory / "test.jsonl")}}
    if source == "directory":
        options = {"name": str(directory)}
    dm = HFPreferenceDataModule(**options, val_split="test", tokenizer=chat_tokenizer, seq_len=192, cache_dir=cache_dir)
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 2
    assert dm.val_dataset[0]["chosen_input_ids"] == trl_rows(FORMATS["multi_turn_system"], chat_tokenizer, 192)[0]["chosen"]


def test_conversational_records_need_a_chat_template(tmp_path, cache_dir, tokenizer):
    train = write_jsonl(tmp_path / "pairs.jsonl", FORMATS["conversational"])
    dm = JsonPreferenceDataModule(train, train, tokenizer=tokenizer, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="conversational records need a chat template"):
        dm.setup("fit")


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


def test_stdlib_pairs_reject_one_mutation_of_each_body_that_still_parses_with_held_out_bodies_unseen(cache_dir, tokenizer):
    options = dict(max_files=MAX_FILES, val_fraction=0.2, cache_dir=cache_dir, seq_len=256)
    pairs = PyPreferenceDataModule(tokenizer, **options)
    records = pairs.load_records()
    instructions = PyInstructDataModule(tokenizer, **options).load_records()
    for split in ("train", "val"):
        bodies = set(zip(instructions[split]["input"], instructions[split]["output"]))
        assert records[split].num_rows > 0
        per_function: dict[str, int] = {}
        for record in records[split]:
            assert record["prompt"] == PY_INSTRUCTION and (record["input"], record["chosen"]) in bodies
            assert record["rejected"] != record["chosen"]
            assert ast.dump(ast.parse(record["rejected"])) != ast.dump(ast.parse(record["chosen"])), "it parses, and means another thing"
            per_function[record["chosen"]] = per_function.get(record["chosen"], 0) + 1
        assert max(per_function.values()) == 3, "several mutations per function"
    trained = {body_hash(body) for body in records["train"]["chosen"]}
    assert not {body_hash(body) for body in records["val"]["chosen"]} & trained, "held-out bodies never seen in training"
    assert not set(records["train"]["input"]) & set(records["val"]["input"]), "held-out functions come from held-out files"
    pairs.setup("fit")
    assert 0 < len(pairs.val_dataset) <= records["val"].num_rows


def test_stdlib_pairs_are_tokenized_as_trls_dpo_trainer_tokenizes_their_conversations(cache_dir, chat_tokenizer):
    """Prompt and body tokenized together and split at the prompt as TRL does: both sides of a pair share the
    prompt's tokens, so no token at the boundary tells the chosen body from the rejected one."""
    seq_len = 512
    pairs = PyPreferenceDataModule(chat_tokenizer, max_files=MAX_FILES, val_fraction=0.2, cache_dir=cache_dir, seq_len=seq_len)
    records = pairs.load_records()["val"]
    pairs.setup("fit")
    expected = trl_rows(list(instruction_conversations(records, chat_tokenizer)), chat_tokenizer, seq_len)
    assert len(pairs.val_dataset) == len(expected) > 0
    for row, theirs in zip(pairs.val_dataset, expected):
        prompt = theirs["prompt"]
        assert row["chosen_input_ids"][:prompt] == row["rejected_input_ids"][:prompt], "one prompt for both sides"
        for side in ("chosen", "rejected"):
            assert row[f"{side}_input_ids"] == theirs[side]
            assert row[f"{side}_labels"] == [IGNORE_INDEX] * prompt + theirs[side][prompt:]
    assert chat_tokenizer.decode(pairs.val_dataset[0]["chosen_input_ids"]).endswith(records[0]["chosen"] + "<|im_end|>\n")


@pytest.mark.slow  # extracts the functions of the whole stdlib (~30 s)
def test_the_default_stdlib_pairs_hold_out_at_least_200_pairs(tmp_path_factory):
    from hydra import compose, initialize_config_module

    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        defaults = compose("config", overrides=["data=py_preference"]).data
    pairs = PyPreferenceDataModule(
        cache_dir=tmp_path_factory.mktemp("default_pairs"),
        **{key: defaults[key] for key in ("val_fraction", "max_val_examples", "rejected", "mutations_per_function", "seed")},
    )
    assert pairs.load_records()["val"].num_rows >= 200


BODY = """if not ready and count < 3:
    return combine(left, right)
elif count == 0:
    return None
result = 1 if key in table else 2
if result is None:
    total = 0
else:
    total = result
return total
"""


def test_each_mutation_kind_edits_one_place_and_leaves_the_rest_of_the_text_as_it_was():
    mutants = mutated_bodies(BODY, count=100)
    kinds = {kind for kind, _ in mutants}
    assert kinds == {"comparison", "boolean", "constant", "not", "branches", "arguments", "returned_name"}
    for kind, mutant in mutants:
        ast.parse(mutant)
        changed = [i for i, (a, b) in enumerate(zip(BODY.splitlines(), mutant.splitlines())) if a != b]
        assert len(mutant.splitlines()) == len(BODY.splitlines())
        assert changed and (len(changed) == 1 or kind == "branches"), (kind, mutant)
    assert ("boolean", BODY.replace("not ready and", "not ready or")) in mutants
    assert ("comparison", BODY.replace("count < 3", "count >= 3")) in mutants
    assert ("not", BODY.replace("not ready", "ready")) in mutants
    assert ("arguments", BODY.replace("combine(left, right)", "combine(right, left)")) in mutants
    assert ("returned_name", BODY.replace("return total", "return result")) in mutants
    assert mutated_bodies(BODY, count=3, seed=1) == mutated_bodies(BODY, count=3, seed=1)
    assert len(mutated_bodies(BODY, count=3)) == 3


def test_shuffled_lines_stay_an_opt_in_smoke_option(cache_dir, tokenizer):
    body = "a = 1\nb = 2\nreturn a + b\n"
    assert shuffled_lines(body, seed=0) == shuffled_lines(body, seed=0) != body
    assert shuffled_lines("return 1\n") is None and shuffled_lines("pass\npass\n") is None
    easy = PyPreferenceDataModule(tokenizer, max_files=MAX_FILES, val_fraction=0.2, cache_dir=cache_dir, rejected="shuffled_lines")
    for record in easy.load_records()["val"]:
        assert sorted(record["rejected"].splitlines()) == sorted(record["chosen"].splitlines())


@pytest.mark.realmodel
@pytest.mark.parametrize("kind", ["standard", "multi_turn_system", "implicit_conversational"])
def test_smollm2s_own_chat_template_tokenizes_as_in_trl(tmp_path, cache_dir, smollm2_dir, kind):
    """SmolLM2's template: <|im_end|> ends each turn and is also its eos."""
    smollm2 = load_tokenizer(smollm2_dir)
    records = FORMATS[kind]
    train = write_jsonl(tmp_path / "pairs.jsonl", records)
    dm = JsonPreferenceDataModule(train, train, tokenizer=smollm2, seq_len=64, cache_dir=cache_dir)
    dm.setup("fit")
    for row, theirs in zip(dm.train_dataset, trl_rows(records, smollm2, 64), strict=True):
        assert row["chosen_input_ids"] == theirs["chosen"] and row["rejected_input_ids"] == theirs["rejected"]
        assert row["chosen_labels"].count(IGNORE_INDEX) == theirs["prompt"]
