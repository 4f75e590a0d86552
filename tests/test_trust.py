"""Run directories, checkpoints and caches that cannot be turned against their user (issue 26, one test per row),
and resume that falls back to an intact checkpoint or continues a moved run (issue 25)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_train import cache_dir, config, subprocess_env, tiny  # noqa: F401  (cache_dir: a fixture)

from lomo_lightning.checkpointing import UntrustedCheckpoint, write_metadata_digest
from lomo_lightning.data.cache import UnsafeCache, content_digest, store_entry, verified_entry
from lomo_lightning.models import ConfigError
from lomo_lightning.resume import continued_config
from lomo_lightning.rundir import MASK
from lomo_lightning.train import main, mark_failed, run

SECRET = "s3cr3t-from-the-environment"
LITERAL_SECRET = "literal-secret-typed-in-a-key"
FINISHED = ["trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_steps=2"]


def lomo_train(*arguments: str) -> int:
    """``lomo-train *arguments`` in this process; its exit code (0 when it returns)."""
    argv = sys.argv
    sys.argv = ["lomo-train", *arguments]
    try:
        main()
    except SystemExit as exit:
        return int(exit.code or 0)
    finally:
        sys.argv = argv
    return 0


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("lomo-train:")]


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under ``directory``: a file's SHA-256, a link's target, a directory's mark."""
    entries = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_file():
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entries[key] = "dir"
    return entries


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:  # noqa: F811
    """A finished 4-step run (checkpoints at steps 2 and 4) whose command line reads a secret from the environment."""
    os.environ["LOMO_TEST_TOKEN"] = SECRET
    directory = tmp_path_factory.mktemp("original") / "run"
    secrets = ["+hf_token=${oc.env:LOMO_TEST_TOKEN}", f"+service.api_key={LITERAL_SECRET}"]
    code = lomo_train(f"hydra.run.dir={directory}", *tiny(*FINISHED, f"data.cache_dir={cache_dir}", *secrets))
    assert code == 0 and (directory / "model" / "config.json").is_file()
    return directory


def copy_of(run_dir: Path, destination: Path) -> Path:
    shutil.copytree(run_dir, destination, symlinks=True)
    return destination


# -- row 1: a run directory is data, not code --------------------------------------------------------

EDITS = {
    "trust-remote-code": ("model.trust_remote_code", True),
    "model-source": ("model.name_or_path", "{tmp}/code_model"),
    "target": ("callbacks.memory_monitor._target_", "shutil.rmtree"),
}


@pytest.mark.parametrize(("key", "value"), EDITS.values(), ids=EDITS.keys())
def test_row1_resume_refuses_a_config_yaml_edited_to_build_or_load_other_code(tmp_path, finished_run, capsys, key, value):
    copy = copy_of(finished_run, tmp_path / "run")
    code_model = tmp_path / "code_model"  # a model folder whose Python would run with trust_remote_code
    code_model.mkdir()
    (code_model / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.Config"}}')
    (code_model / "modeling_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    saved = OmegaConf.load(copy / "config.yaml")
    OmegaConf.update(saved, key, value.format(tmp=tmp_path) if isinstance(value, str) else value)
    OmegaConf.save(saved, copy / "config.yaml")
    before = snapshot(copy)

    code = lomo_train(f"resume={copy}")

    errors = error_lines(capsys)
    assert code == 2
    assert len(errors) == 1 and f"sets {key}=" in errors[0] and "resume_trusted=true" in errors[0], errors
    assert not (tmp_path / "ran").exists()
    assert {k: v for k, v in snapshot(copy).items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}

    composed = OmegaConf.create({"resume": str(copy), "ckpt_path": None, "resume_trusted": True})
    continued, _ = continued_config(composed, [f"resume={copy}", "resume_trusted=true"], [])
    assert OmegaConf.select(continued, key) == OmegaConf.select(saved, key)  # accepted knowingly


def test_row1_a_run_of_a_gguf_model_saved_with_its_cached_conversion_passes_the_check(tmp_path):
    """model=smollm2 trains on (and saves) the cached conversion of its GGUF file: that is what recomposing gives too."""
    from lomo_lightning.models import SMOLLM2_INSTALL, converted_gguf_directory
    from lomo_lightning.trust import check_resume_trusted

    overrides = ["model=smollm2", "data=py_instruct", f"data.cache_dir={tmp_path / 'cache'}"]
    try:
        saved = config(tmp_path / "run", tmp_path / "cache", *overrides)
    except Exception:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}")
    converted = str(converted_gguf_directory(saved.model.name_or_path, saved.model.gguf_file, tmp_path / "cache"))
    saved.model.name_or_path, saved.model.gguf_file = converted, None  # as train.use_converted_gguf leaves it
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in tiny(*overrides)))
    saved = OmegaConf.create(OmegaConf.to_container(saved, resolve=True))

    check_resume_trusted(saved, tmp_path / "run")
    saved.data.tokenizer = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="sets data.tokenizer="):
        check_resume_trusted(saved, tmp_path / "run")


# -- row 2: FSDP checkpoints' .metadata (pickle) -----------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_row2_a_planted_fsdp_metadata_is_refused_before_it_is_unpickled(tmp_path):
    import torch.distributed.checkpoint as dcp

    from lomo_lightning.resume import damage
    from lomo_lightning.strategies.fsdp import FSDP2Strategy

    checkpoint = tmp_path / "step-000002.ckpt"
    dcp.save({"weight": torch.ones(3)}, checkpoint_id=checkpoint)
    write_metadata_digest(checkpoint)  # as FSDP2Strategy.save_checkpoint does
    assert damage(checkpoint) is None
    marker = tmp_path / "ran"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))

    with pytest.raises(UntrustedCheckpoint, match="its .metadata is not the one saved"):
        FSDP2Strategy().load_checkpoint(checkpoint)
    assert "not the one saved" in str(damage(checkpoint))  # and resume does not pick it
    assert not marker.exists()


# -- rows 3, 6, 7 and the intact-checkpoint fallback: one attacked copy, moved elsewhere, resumed -------


@pytest.fixture(scope="module")
def attacked_copy(tmp_path_factory: pytest.TempPathFactory, finished_run: Path) -> dict[str, Path]:
    """A copy of the finished run moved elsewhere, then attacked, then resumed to step 6.

    - its step-2 checkpoint (which passes ``weights_only``) lists ``<dirpath>/../../victim`` as a kept checkpoint,
      next to be pruned (row 3);
    - its newest checkpoint (``last.ckpt`` -> step 4) is cut short, as by a full disk (issue 25);
    - ``.model.partial`` is a link to a victim folder and ``config.yaml`` a link to a victim file (row 6).
    """
    root = tmp_path_factory.mktemp("moved")
    copy = copy_of(finished_run, root / "elsewhere" / "run")
    paths = {"original": finished_run, "copy": copy}
    for name, parent in (("victim_at_original", finished_run.parent), ("victim_at_copy", copy.parent)):
        victim = parent / "victim"
        victim.mkdir(exist_ok=True)
        (victim / "precious.txt").write_text("keep me")
        paths[name] = victim

    step2 = copy / "checkpoints" / "step-000002.ckpt"
    state = torch.load(step2, weights_only=True)
    (key,) = [key for key in state["callbacks"] if key.startswith("PeriodicCheckpoint")]
    callback = state["callbacks"][key]
    planted = f"{callback['dirpath']}/../../victim"
    callback["best_k_models"][planted] = torch.tensor(-1.0)
    callback["kth_best_model_path"], callback["kth_value"] = planted, torch.tensor(-1.0)
    assert len(callback["best_k_models"]) == 2  # keep_last: the next save deletes the kth, the victim
    torch.save(state, step2)
    step4 = copy / "checkpoints" / "step-000004.ckpt"
    step4.write_bytes(step4.read_bytes()[: step4.stat().st_size // 2])

    paths["victim_folder"] = root / "victim_folder"
    paths["victim_folder"].mkdir()
    (copy / ".model.partial").symlink_to(paths["victim_folder"])
    paths["victim_config"] = root / "victim_config.yaml"
    shutil.move(copy / "config.yaml", paths["victim_config"])
    (copy / "config.yaml").symlink_to(paths["victim_config"])
    paths["victim_config_digest"] = Path(hashlib.sha256(paths["victim_config"].read_bytes()).hexdigest())

    original = snapshot(finished_run)
    assert lomo_train(f"resume={copy}", "trainer.max_steps=6") == 0
    assert snapshot(finished_run) == original, "the resumed copy wrote into the original run"
    return paths


def test_row3_pruning_after_resume_never_deletes_outside_the_checkpoint_directory(attacked_copy):
    for victim in (attacked_copy["victim_at_original"], attacked_copy["victim_at_copy"]):
        assert (victim / "precious.txt").read_text() == "keep me"
    assert "dropped, nothing there will be deleted" in (attacked_copy["copy"] / "train.log").read_text()


def test_row3_restored_paths_outside_dirpath_are_dropped_and_never_removed(tmp_path):
    from lomo_lightning.checkpointing import ContainedCheckpoint

    dirpath, victim = tmp_path / "run" / "checkpoints", tmp_path / "victim"
    dirpath.mkdir(parents=True)
    victim.mkdir()
    kept, planted = str(dirpath / "step-2.ckpt"), f"{dirpath}/../../victim"
    checkpoint = ContainedCheckpoint(dirpath=dirpath, monitor="step", mode="max", save_top_k=2)
    checkpoint.load_state_dict({
        "dirpath": str(dirpath), "best_model_score": None, "best_model_path": kept, "kth_value": torch.tensor(-1.0),
        "best_k_models": {kept: torch.tensor(2.0), planted: torch.tensor(-1.0)}, "kth_best_model_path": planted,
        "last_model_path": planted,
    })
    assert list(checkpoint.best_k_models) == [kept] and checkpoint.kth_best_model_path == kept
    assert checkpoint.last_model_path == ""
    checkpoint._remove_checkpoint(None, planted)  # type: ignore[arg-type]  # refused before the trainer is used
    assert victim.is_dir()


def test_row6_writes_replace_planted_links_instead_of_following_them(attacked_copy, tmp_path):
    copy = attacked_copy["copy"]
    assert list(attacked_copy["victim_folder"].iterdir()) == []  # the model was not saved through the link
    assert (copy / "model").is_dir() and not (copy / "model").is_symlink() and (copy / "model" / "config.json").is_file()
    assert hashlib.sha256(attacked_copy["victim_config"].read_bytes()).hexdigest() == attacked_copy["victim_config_digest"].name
    assert not (copy / "config.yaml").is_symlink()  # config.yaml replaced atomically, the link with it

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "FAILED").symlink_to(victim)
    mark_failed(tmp_path, RuntimeError("boom"))
    assert victim.read_text() == "keep me" and (tmp_path / "FAILED").read_text() == "RuntimeError: boom\n"


def test_row7_a_moved_run_resumes_where_it_now_is_and_never_writes_into_the_original(attacked_copy):
    copy, original = attacked_copy["copy"], attacked_copy["original"]
    assert (copy / "checkpoints" / "step-000006.ckpt").is_file()
    assert not (original / "checkpoints" / "step-000006.ckpt").exists()  # (and the fixture compared every file)
    assert os.path.realpath(copy / "checkpoints" / "last.ckpt") == str((copy / "checkpoints" / "step-000006.ckpt").resolve())
    steps = [row.split(",") for row in (copy / "csv" / "metrics.csv").read_text().splitlines()]
    assert len(steps) > 1
    saved = OmegaConf.load(copy / "config.yaml")
    assert OmegaConf.to_container(saved, resolve=False)["callbacks"]["checkpoint"]["dirpath"] == "${output_dir}/checkpoints"


def test_resume_with_a_truncated_last_checkpoint_continues_from_the_newest_intact_one(attacked_copy):
    log = (attacked_copy["copy"] / "train.log").read_text()
    assert re.search(r"checkpoints/last.ckpt: unreadable .*: continuing from step-000002.ckpt, the newest intact checkpoint", log)
    state = torch.load(attacked_copy["copy"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6


def test_resume_refuses_in_one_line_when_no_checkpoint_is_intact(tmp_path, finished_run, capsys):
    copy = copy_of(finished_run, tmp_path / "run")
    for checkpoint in (copy / "checkpoints").glob("step-*.ckpt"):
        checkpoint.write_bytes(b"PK\x03\x04 cut short")

    assert lomo_train(f"resume={copy}") == 2
    (error,) = error_lines(capsys)
    assert "no intact checkpoint" in error and "step-000002.ckpt: unreadable" in error


# -- row 4: caches that check what they load ---------------------------------------------------------


def test_row4_a_planted_data_cache_entry_is_rejected_and_rebuilt(tmp_path, caplog):
    cfg = config(tmp_path / "run", tmp_path / "cache")

    def train_tokens() -> list[list[int]]:
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule.train_dataset["input_ids"][:8]

    real = train_tokens()
    (entry,) = (tmp_path / "cache" / "datasets").glob("stdlib-lm-*")
    planted = [[7] * len(real[0]) for _ in range(len(real))]
    from datasets import Dataset, DatasetDict

    shutil.rmtree(entry)
    DatasetDict({"train": Dataset.from_dict({"input_ids": planted}), "val": Dataset.from_dict({"input_ids": planted})}).save_to_disk(str(entry))

    assert train_tokens() == real
    assert "Cache entry" in caplog.text and "no digest" in caplog.text

    reference = tmp_path / "cache" / "reference_logps" / "key.safetensors"  # a file entry (DPO's reference log-probs)
    store_entry(reference, lambda staging: staging.write_bytes(b"stored"), directory=False)
    assert verified_entry(reference)
    reference.write_bytes(b"planted")
    assert not verified_entry(reference)


def test_row4_a_cached_dataset_stays_verified_after_datasets_caches_a_map_beside_it(tmp_path, caplog):
    """``datasets`` writes ``cache-<fingerprint>.arrow`` into a loaded dataset's folder (the tokenized
    instructions are such a map): derived, not stored, so the entry is still what was stored and is reused."""
    from datasets import Dataset, DatasetDict

    from lomo_lightning.data.cache import cached_dataset_dict

    entry = tmp_path / "cache" / "datasets" / "records"
    built = []

    def build() -> DatasetDict:
        built.append(1)
        return DatasetDict({"train": Dataset.from_dict({"x": list(range(50))})})

    loaded = cached_dataset_dict(entry, build)
    loaded["train"].map(lambda row: {"y": row["x"] * 2}, new_fingerprint="doubled")
    assert list(entry.glob("train/cache-*.arrow")), "datasets wrote its map cache into the entry"

    assert cached_dataset_dict(entry, build)["train"]["x"] == list(range(50))
    assert built == [1] and "Cache entry" not in caplog.text


def test_jobs_that_build_the_same_cache_entry_at_once_keep_the_first_one_in_place(tmp_path, caplog):
    """The jobs of a sweep share the cache and each builds an entry it finds missing. The first to finish puts its
    entry in place; a later one used to replace it, pulling its files from under a job that was reading it (CI: a
    multirun job failed in the middle of verifying it). Now the later job keeps it, and drops its own copy."""
    entry = tmp_path / "cache" / "datasets" / "stdlib-lm-key"

    def write(staging: Path) -> None:
        (staging / "train").mkdir()
        (staging / "train" / "data.arrow").write_bytes(b"the same content under the same key")

    first: dict[str, object] = {}

    def write_while_another_job_finishes(staging: Path) -> None:
        store_entry(entry, write)  # the other job, started later, finishes first
        first["inode"], first["handle"] = entry.stat().st_ino, open(entry / "train" / "data.arrow", "rb")  # noqa: SIM115
        write(staging)

    store_entry(entry, write_while_another_job_finishes)
    handle = first["handle"]
    assert entry.stat().st_ino == first["inode"], "the entry in place was replaced"
    assert (entry / "train" / "data.arrow").is_file() and handle.read() == b"the same content under the same key"
    handle.close()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name], "no staging copy is left behind"
    assert verified_entry(entry) and "Cache entry" not in caplog.text


def test_an_entry_replaced_while_it_is_verified_is_read_again_not_rebuilt(tmp_path, monkeypatch, caplog):
    """A file vanishing while an entry is hashed means another process renamed a complete copy into place (entries are
    renamed in whole): the entry is read again, not declared bad and rebuilt."""
    import lomo_lightning.cache_entries as cache_entries

    entry = store_entry(tmp_path / "cache" / "entry", lambda staging: (staging / "data.bin").write_bytes(b"x"))
    real_digest, calls = cache_entries.content_digest, []

    def replaced_once(path: Path) -> str:
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", str(path / "data.bin"))
        return real_digest(path)

    monkeypatch.setattr(cache_entries, "content_digest", replaced_once)
    assert verified_entry(entry) and len(calls) == 2
    assert "Cache entry" not in caplog.text


# -- rows 5 and 8: a new run gets a directory of its own, and cleaning up removes only what it wrote ----


def test_row5_a_new_run_into_an_existing_run_is_refused_and_changes_nothing(tmp_path, finished_run, capsys, cache_dir):  # noqa: F811
    copy = copy_of(finished_run, tmp_path / "run")
    (copy / "model" / "user_notes.txt").write_text("mine")
    before = snapshot(copy)

    code = lomo_train(f"hydra.run.dir={copy}", *tiny(f"data.cache_dir={cache_dir}"))

    (error,) = error_lines(capsys)
    assert code == 2 and f"output_dir {copy} is not empty" in error and "overwrite=true" in error
    assert snapshot(copy) == before


@pytest.mark.slow  # two fresh interpreters import torch, Lightning and transformers
def test_row5_two_runs_started_in_the_same_second_get_different_directories(tmp_path):
    script = (
        "from hydra import compose, initialize_config_module; import lomo_lightning.train\n"
        "with initialize_config_module('lomo_lightning.conf', version_base='1.3'):\n"
        "    print(compose('config', return_hydra_config=True, overrides=['hydra.job.name=x']).hydra.run.dir)\n"
    )
    env = subprocess_env(tmp_path)
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    directories = [process.communicate(timeout=300)[0].strip() for process in processes]
    assert all(directory.startswith("outputs/") for directory in directories)
    assert directories[0] != directories[1]


def test_row8_a_failed_start_leaves_the_users_files_and_folder(tmp_path, capsys, cache_dir):  # noqa: F811
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.log").write_text("my own log\n")

    assert lomo_train(f"hydra.run.dir={folder}", *tiny(f"data.cache_dir={cache_dir}", "method.optimizer.lr=-1")) == 2
    assert lomo_train(f"hydra.run.dir={folder}", "overwrite=true", *tiny(f"data.cache_dir={cache_dir}", "method.optimizer.lr=-1")) == 2
    assert lomo_train(f"resume={folder}") == 2

    errors = error_lines(capsys)
    assert "is not empty" in errors[0] and "lr must be >= 0" in errors[1] and "no config.yaml there" in errors[2], errors
    assert (folder / "train.log").read_text().startswith("my own log\n")
    assert sorted(p.name for p in folder.iterdir()) == ["train.log"]  # what the run wrote (.hydra/) is gone


# -- row 9: secrets stay out -------------------------------------------------------------------------


def test_row9_no_secret_lands_in_a_file_the_run_writes(finished_run):
    written = [path for path in finished_run.rglob("*") if path.is_file() and not path.is_symlink()]
    assert any(path.name == "hparams.yaml" for path in written)
    for path in written:
        content = path.read_bytes()
        assert SECRET.encode() not in content, path
        if path.parent.name != ".hydra":  # Hydra records the command line as typed: pass secrets by ${oc.env:...}
            assert LITERAL_SECRET.encode() not in content, path
    saved = OmegaConf.to_container(OmegaConf.load(finished_run / "config.yaml"), resolve=False)
    assert saved["hf_token"] == "${oc.env:LOMO_TEST_TOKEN}" and saved["service"]["api_key"] == MASK
    assert saved["model"]["llama"]["num_key_value_heads"] == 2  # a key with "key" in it that is no secret

    typed = [f"resume={finished_run}", "+service.api_key=${oc.env:LOMO_TEST_TOKEN}"]  # given again when resuming
    with initialize_config_module("lomo_lightning.conf", version_base="1.3"):
        composed = compose("config", overrides=typed, return_hydra_config=True)
    continued, changes = continued_config(composed, typed, composed.hydra.runtime.choices.keys())
    assert SECRET not in "\n".join(changes) and changes == ["service.api_key: changed (not shown: it looks like a secret)"]
    assert OmegaConf.to_container(continued, resolve=False)["service"]["api_key"] == "${oc.env:LOMO_TEST_TOKEN}"


# -- row 10: data files ------------------------------------------------------------------------------


def test_row10_deep_nesting_and_oversized_records_are_one_line_errors_not_crashes(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    import lomo_lightning.data.instructions as instructions

    def never(*args, **kwargs):
        raise AssertionError("datasets' JSON reader was given input the stdlib parser rejected")

    monkeypatch.setattr(instructions, "load_dataset", never)
    files = {
        "deep.jsonl": ('{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}\n', "line 1: nested too deeply"),
        "nested.jsonl": ('{"instruction": "a", "output": "b"}\n{"instruction": ' + "[" * 40 + "]" * 40 + ', "output": "x"}\n',
                         "line 2: nested deeper than 32 levels"),
        "huge.jsonl": ('{"instruction": "' + "a" * (instructions.MAX_RECORD_BYTES + 10) + '", "output": "x"}\n',
                       "line 1 is over 16 MiB"),
    }
    for name, (content, message) in files.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ConfigError, match=f"data.train_file: .*{name} cannot be read as json: {message}"):
            run(config(tmp_path / name.replace(".", "_"), cache_dir, "data=jsonl", f"data.train_file={tmp_path / name}"))


# -- row 11: a cache shared by two users -------------------------------------------------------------


def test_row11_cache_entries_get_the_umask_and_unsafe_cache_folders_are_refused(tmp_path, cache_dir):  # noqa: F811
    previous = os.umask(0o022)
    try:
        entry = store_entry(tmp_path / "shared" / "entry", lambda staging: (staging / "data.bin").write_bytes(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755 and stat.S_IMODE((entry / "data.bin").stat().st_mode) == 0o644
    assert verified_entry(entry) and content_digest(entry)

    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    with pytest.raises(ConfigError, match=f"cache folder {open_folder}.* is writable by every user"):
        run(config(tmp_path / "run", open_folder))
    if os.getuid() == 0:  # another user's folder (root can make one here)
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 12345, 12345)
        with pytest.raises(UnsafeCache, match="belongs to another user"):
            verified_entry(foreign / "entry")
