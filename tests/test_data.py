"""Contracts of the data layer: stable splits, a cached tokenizer, packed blocks and prompt-masked labels.

Everything runs offline on a small sample of the interpreter's stdlib with a 512-token BPE.
"""

from __future__ import annotations

import copy
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from lomo_lightning.data import (
    IGNORE_INDEX,
    HFInstructionDataModule,
    InstructionCollator,
    JsonInstructionDataModule,
    PyInstructDataModule,
    PythonStdlibDataModule,
    ResumableDataLoader,
    format_prompt,
    function_examples,
    load_tokenizer,
    python_stdlib,
    render_prompt,
    split_files,
    split_halves,
    stdlib_source_files,
)
from lomo_lightning.data import tokenizer as tokenizer_module
from lomo_lightning.data.stdlib import relative_key

MAX_FILES = 40
VOCAB = 512


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lomo_cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path):
    return load_tokenizer(vocab_size=VOCAB, max_files=MAX_FILES, cache_dir=cache_dir)


def test_stdlib_files_skip_tests_and_installed_packages() -> None:
    files = stdlib_source_files(60)
    assert len(files) == 60
    assert files == stdlib_source_files(60)
    keys = [relative_key(path) for path in files]
    assert keys == sorted(keys)
    for key in keys:
        parts = set(key.split("/")[:-1])
        assert not parts & {"site-packages", "test", "tests", "idlelib"}, key


def test_split_is_by_file_disjoint_and_deterministic() -> None:
    files = stdlib_source_files(60)
    train, val = split_files(files, val_fraction=0.2, seed=0)
    assert (train, val) == split_files(files, val_fraction=0.2, seed=0)
    assert val and train and not set(train) & set(val)
    assert sorted(train + val) == sorted(files)
    # A file's side depends only on its own path: a subset of files is split consistently.
    sub_train, sub_val = split_files(files[:30], val_fraction=0.2, seed=0)
    assert set(sub_val) == set(val) & set(files[:30])
    assert len({tuple(split_files(files, 0.2, seed)[1]) for seed in range(4)}) > 1


def test_split_keeps_one_val_file_for_tiny_corpora() -> None:
    files = stdlib_source_files(3)
    train, val = split_files(files, val_fraction=0.01)
    assert len(val) == 1 and len(train) == 2


def test_halves_partition_the_train_files() -> None:
    train, _ = split_files(stdlib_source_files(60))
    first, second = split_halves(train)
    assert (first, second) == split_halves(train)
    assert first and second and not set(first) & set(second)
    assert sorted(first + second) == sorted(train)


def test_tokenizer_is_cached_and_round_trips(cache_dir: Path, tokenizer, monkeypatch) -> None:
    assert len(tokenizer) == VOCAB
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = 'def f(x):\n    """Dóc — ünïcode ✓."""\n\treturn x  # tab\n'
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    def fail(*args, **kwargs):
        raise AssertionError("the second load retrained the tokenizer")

    monkeypatch.setattr(tokenizer_module, "train_stdlib_bpe", fail)
    again = load_tokenizer(vocab_size=VOCAB, max_files=MAX_FILES, cache_dir=cache_dir)
    assert again.get_vocab() == tokenizer.get_vocab()
    python = ".".join(map(str, sys.version_info[:3]))
    entries = [path.name for path in (cache_dir / "tokenizers").iterdir()]
    assert entries == [f"stdlib-bpe-v{VOCAB}-f{MAX_FILES}-py{python}"]  # no staging directory left behind


def test_default_cache_root_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOMO_LIGHTNING_CACHE", str(tmp_path))
    assert tokenizer_module.default_cache_dir() == tmp_path


def test_stdlib_corpus_packs_full_blocks(cache_dir: Path, tokenizer, monkeypatch) -> None:
    seq_len = 32
    dm = PythonStdlibDataModule(tokenizer, seq_len=seq_len, batch_size=4, max_files=MAX_FILES, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    train_files, val_files = dm.split()
    assert not set(train_files) & set(val_files)
    expected_tokens = sum(
        len(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]) + 1
        for path in train_files
    )
    assert len(dm.train_dataset) == expected_tokens // seq_len
    assert all(len(row) == seq_len for row in dm.train_dataset["input_ids"])
    first_text = train_files[0].read_text(encoding="utf-8")
    assert first_text.startswith(tokenizer.decode(dm.train_dataset[0]["input_ids"]))

    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, seq_len) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())
    assert torch.equal(next(iter(dm.train_dataloader()))["input_ids"], batch["input_ids"])  # seeded shuffle
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["input_ids"].tolist() == dm.val_dataset["input_ids"][:4]  # no shuffle

    monkeypatch.setattr(python_stdlib, "pack_files", lambda *a: pytest.fail("the second run re-tokenized"))
    cached = PythonStdlibDataModule(
        tokenizer, seq_len=seq_len, max_files=MAX_FILES, cache_dir=cache_dir, max_val_blocks=3
    )
    cached.setup("fit")
    assert cached.train_dataset["input_ids"] == dm.train_dataset["input_ids"]
    assert cached.val_dataset["input_ids"] == dm.val_dataset["input_ids"][:3]


def test_stdlib_halves_share_validation(cache_dir: Path, tokenizer) -> None:
    modules = {
        subset: PythonStdlibDataModule(tokenizer, seq_len=32, max_files=MAX_FILES, cache_dir=cache_dir, subset=subset)
        for subset in ("first_half", "second_half")
    }
    for dm in modules.values():
        dm.setup("fit")
    first, second = (set(dm.split()[0]) for dm in modules.values())
    assert first and second and not first & second
    assert modules["first_half"].val_dataset["input_ids"] == modules["second_half"].val_dataset["input_ids"]
    with pytest.raises(ValueError, match="subset must be"):
        PythonStdlibDataModule(tokenizer, subset="third_half")


def test_function_examples_split_signature_docstring_and_body(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        textwrap.dedent(
            '''
            class Box:
                def area(self, scale: int = 1) -> int:
                    """Area of the box,
                    scaled."""
                    # width times height
                    return self.w * self.h * scale

            def undocumented():
                return 1

            def too_long():
                """Doc."""
            '''
        )
        + "".join(f"    x{i} = {i}\n" for i in range(41)),
        encoding="utf-8",
    )
    (example,) = function_examples(source)
    assert example["input"] == 'def area(self, scale: int = 1) -> int:\n    """Area of the box,\n    scaled."""'
    assert example["output"] == "# width times height\nreturn self.w * self.h * scale\n"


def _assert_prompt_masked(records: Dataset, tokenized: Dataset, tokenizer, seq_len: int) -> int:
    """Check every tokenized example against its record; returns how many records had to be dropped."""
    rows = iter(tokenized)
    dropped = 0
    for record in records:
        prompt = tokenizer(render_prompt(tokenizer, record["instruction"], record["input"]), add_special_tokens=False)["input_ids"]
        if len(prompt) >= seq_len:
            dropped += 1
            continue
        row = next(rows)
        labels = row["labels"]
        assert row["input_ids"][: len(prompt)] == prompt
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert IGNORE_INDEX not in labels[len(prompt) :]
        assert labels[len(prompt) :] == row["input_ids"][len(prompt) :]
        response = tokenizer.decode(labels[len(prompt) :])
        full = record["output"] + tokenizer.eos_token
        if len(row["input_ids"]) < seq_len:
            assert response == full
        else:  # truncated: only the response is cut
            assert len(row["input_ids"]) == seq_len and full.startswith(response)
    assert next(rows, None) is None
    return dropped


def test_py_instruct_masks_prompts_and_splits_by_file(cache_dir: Path, tokenizer) -> None:
    seq_len = 256
    dm = PyInstructDataModule(tokenizer, seq_len=seq_len, max_files=MAX_FILES, cache_dir=cache_dir, val_fraction=0.2)
    dm.prepare_data()
    dm.setup("fit")
    records = dm.load_records()
    train_files, val_files = ({relative_key(path) for path in files} for files in dm.split())
    assert set(records["train"]["file"]) <= train_files and set(records["val"]["file"]) <= val_files
    assert records["val"].num_rows > 0 and not train_files & val_files
    assert all(text == "Complete the body of this Python function." for text in records["train"]["instruction"])
    for split in ("train", "val"):
        dataset = getattr(dm, f"{split}_dataset")
        dropped = _assert_prompt_masked(records[split], dataset, tokenizer, seq_len)
        assert dm.num_dropped[split] == dropped

    capped = PyInstructDataModule(tokenizer, seq_len=seq_len, max_files=MAX_FILES, cache_dir=cache_dir, max_examples=5)
    capped.setup("fit")
    assert capped.load_records()["train"].num_rows == 5


def test_collator_pads_with_pad_id_zero_attention_and_ignored_labels() -> None:
    batch = InstructionCollator(pad_token_id=7)(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
    {"instruction": "Say hello.", "output": "hello world"},
    {"instruction": "Repeat the word.", "input": "", "output": "spam " * 40},
]


CHAT_TEMPLATE = (
    "{% for message in messages %}<|turn|>{{ message['role'] }}\n{{ message['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)


def test_prompts_use_the_tokenizers_chat_template_when_it_has_one(tmp_path: Path, cache_dir: Path, tokenizer) -> None:
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    assert render_prompt(chat, "Add.", "2 3") == "<|turn|>user\nAdd.\n\n2 3<|endoftext|><|turn|>assistant\n"
    assert render_prompt(tokenizer, "Add.", "2 3") == format_prompt("Add.", "2 3"), "no template: the Alpaca prompt"

    train = _write_jsonl(tmp_path / "train.jsonl", RECORDS)
    plain = JsonInstructionDataModule(train, train, tokenizer=tokenizer, seq_len=192, cache_dir=cache_dir)
    templated = JsonInstructionDataModule(train, train, tokenizer=chat, seq_len=192, cache_dir=cache_dir)
    plain.setup("fit")
    templated.setup("fit")
    records = templated.load_records()
    assert _assert_prompt_masked(records["train"], templated.train_dataset, chat, 192) == 0
    # the tokenized-dataset cache tells the two apart: the template decides the tokens
    assert plain.train_dataset[0]["input_ids"] != templated.train_dataset[0]["input_ids"]
    assert tokenizer.decode(templated.train_dataset[0]["input_ids"]).startswith("<|turn|>user\n")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_jsonl_instructions_mask_prompts_and_truncate_responses(tmp_path: Path, cache_dir: Path, tokenizer) -> None:
    seq_len = 192
    train = _write_jsonl(tmp_path / "train.jsonl", RECORDS)
    val = _write_jsonl(tmp_path / "val.jsonl", RECORDS[:1])
    dm = JsonInstructionDataModule(train, val, tokenizer=tokenizer, seq_len=seq_len, batch_size=3, cache_dir=cache_dir)
    dm.setup("fit")
    records = dm.load_records()
    assert records["train"]["input"] == ["2 3", "", ""]
    assert _assert_prompt_masked(records["train"], dm.train_dataset, tokenizer, seq_len) == 0
    assert len(dm.train_dataset[2]["input_ids"]) == seq_len  # the long response was truncated, not dropped
    batch = next(iter(dm.val_dataloader()))
    assert (batch["labels"] != IGNORE_INDEX).sum() == len(tokenizer("5", add_special_tokens=False)["input_ids"]) + 1


def test_json_list_and_parquet_with_held_out_fraction(tmp_path: Path, cache_dir: Path, tokenizer) -> None:
    records = [{"instruction": f"Task {i}.", "input": "", "output": f"answer {i}"} for i in range(20)]
    (tmp_path / "list.json").write_text(json.dumps(records), encoding="utf-8")
    Dataset.from_list(records).to_parquet(str(tmp_path / "data.parquet"))
    splits = []
    for name in ("list.json", "data.parquet"):
        dm = JsonInstructionDataModule(tmp_path / name, val_fraction=0.2, tokenizer=tokenizer, cache_dir=cache_dir)
        dm.setup("fit")
        loaded = dm.load_records()
        assert loaded["val"].num_rows == 4 and loaded["train"].num_rows == 16
        assert not set(loaded["train"]["output"]) & set(loaded["val"]["output"])
        splits.append(sorted(loaded["val"]["output"]))
    assert splits[0] == splits[1]  # same seed, same records: same held-out examples


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "instruction file not found"),
        ("", ValueError, "is empty"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], ValueError, r"record 1 .* 'output' field"),
        ([{"input": "x", "output": "b"}], ValueError, r"record 0 .* 'instruction' field"),
    ],
)
def test_bad_instruction_files_fail_clearly(tmp_path: Path, cache_dir: Path, tokenizer, content, error, message):
    path = tmp_path / "bad.jsonl"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        _write_jsonl(path, content)
    dm = JsonInstructionDataModule(path, path, tokenizer=tokenizer, cache_dir=cache_dir)
    with pytest.raises(error, match=message):
        dm.setup("fit")


def test_too_short_seq_len_fails_clearly(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(ValueError, match="seq_len must be at least 8"):
        JsonInstructionDataModule(tmp_path / "train.jsonl", tokenizer=tokenizer, seq_len=4)


def test_hf_instructions_map_fields_from_a_local_dataset(tmp_path: Path, cache_dir: Path, tokenizer) -> None:
    data = tmp_path / "hub_like"
    data.mkdir()
    renamed = [{"prompt": r["instruction"], "completion": r["output"]} for r in RECORDS]
    _write_jsonl(data / "train.jsonl", renamed)
    _write_jsonl(data / "validation.jsonl", renamed[:1])
    dm = HFInstructionDataModule(
        str(data),
        val_split="validation",
        instruction_field="prompt",
        input_field=None,
        output_field="completion",
        tokenizer=tokenizer,
        seq_len=192,
        cache_dir=cache_dir,
    )
    dm.setup("fit")
    records = dm.load_records()
    assert records["train"]["instruction"] == [r["instruction"] for r in RECORDS]
    assert records["train"]["input"] == ["", "", ""]
    _assert_prompt_masked(records["val"], dm.val_dataset, tokenizer, 192)

    # unmapped, the same columns are TRL's prompt-completion format (tests/test_instruction_formats.py); columns
    # in neither form are refused
    other = tmp_path / "other_columns"
    other.mkdir()
    _write_jsonl(other / "train.jsonl", [{"question": r["instruction"], "answer": r["output"]} for r in RECORDS])
    wrong = HFInstructionDataModule(str(other), tokenizer=tokenizer, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="has no column 'instruction'.*pass instruction_field="):
        wrong.setup("fit")


def test_batches_train_a_causal_lm_with_workers(cache_dir: Path, tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    corpus = PythonStdlibDataModule(tokenizer, seq_len=32, max_files=MAX_FILES, cache_dir=cache_dir, num_workers=1)
    instruct = PyInstructDataModule(tokenizer, seq_len=256, max_files=MAX_FILES, cache_dir=cache_dir, num_workers=1)
    for dm in (corpus, instruct):
        dm.setup("fit")
        loss = model(**next(iter(dm.train_dataloader()))).loss
        assert torch.isfinite(loss) and loss.item() > 0


# -- the training loader: resumable mid-epoch, sharded by process ---------------------------------


def epochs_of(loader: ResumableDataLoader, epochs: int) -> list[list[int]]:
    """The batches of ``epochs`` epochs, each started as Lightning does, with ``set_epoch``."""
    batches = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        batches += [batch.tolist() for batch in loader]
    return batches


@pytest.mark.parametrize("stop_after", [3, 4, 9])  # mid-epoch, at the end of an epoch, in the third epoch
def test_a_restored_loader_continues_with_the_batches_an_uninterrupted_one_yields(stop_after):
    examples = list(range(10))  # 4 batches of 3 an epoch, the last one short
    uninterrupted = epochs_of(ResumableDataLoader(examples, batch_size=3, seed=0), 3)

    first = ResumableDataLoader(examples, batch_size=3, seed=0)
    seen, epoch = [], 0
    while len(seen) < stop_after:
        first.sampler.set_epoch(epoch)
        for batch in first:
            seen.append(batch.tolist())
            if len(seen) == stop_after:
                break
        epoch += 1
    state = first.state_dict()

    resumed = ResumableDataLoader(examples, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    for epoch in range(stop_after // 4, 3):  # as Lightning: the epoch of the last batch, the next after its end
        resumed.sampler.set_epoch(epoch)
        seen += [batch.tolist() for batch in resumed]
    assert seen == uninterrupted
    assert sorted(sum(uninterrupted[:4], [])) == examples  # every example once an epoch
    assert uninterrupted[:4] != uninterrupted[4:8]  # in another order each epoch


def test_processes_share_every_epoch_and_iterated_by_hand_the_epoch_advances():
    examples = list(range(12))
    ranks = [ResumableDataLoader(examples, batch_size=2, seed=0, num_replicas=2, rank=rank) for rank in (0, 1)]
    shares = [sum((batch.tolist() for batch in loader), []) for loader in ranks]
    assert sorted(shares[0] + shares[1]) == examples
    second_epoch = sum((batch.tolist() for batch in ranks[0]), [])  # no set_epoch: the loader moved on itself
    assert sorted(second_epoch + sum((batch.tolist() for batch in ranks[1]), [])) == examples
    assert second_epoch != shares[0]
