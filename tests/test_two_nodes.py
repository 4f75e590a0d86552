"""Beyond one machine, simulated on this one: two "nodes" (``trainer.num_nodes=2``, ``devices=1``, gloo, the
environment Lightning reads on a cluster) equal one process on the same global batch; and ``launcher=slurm``'s
multirun through submitit's local executor."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from distributed_runs import RULES, STEPS, global_batches
from omegaconf import OmegaConf

from lomo_lightning import FusedUpdater

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("strategy", ["lomo_fsdp", "lomo_ddp"])
def test_two_nodes_equal_one_process_on_the_global_batch(tmp_path, strategy):
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")}
    nodes = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "two_nodes.py"), str(tmp_path), strategy],
            env={**base, "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    got = torch.load(tmp_path / f"{strategy}.pt", weights_only=False)
    assert got["ranks"] == (0, 2, 2, 1) and got["global_step"] == STEPS  # rank 0 of 2, over 2 nodes of 1 device

    model = tiny_llama()
    updater = FusedUpdater(model, RULES["adalomo"](model.parameters()))
    for batch in global_batches():
        assert updater.backward(model(**batch).loss)
    expected, untrained = model.state_dict(), tiny_llama().state_dict()
    assert got["params"].keys() == expected.keys()
    assert max((got["params"][k] - untrained[k]).abs().max().item() for k in expected) > 5e-4, "training moved them"
    assert max((got["params"][k] - expected[k]).abs().max().item() for k in expected) < 1e-5


def test_launcher_slurm_runs_a_two_job_multirun_through_submitits_local_executor(tmp_path):
    """``launcher=slurm`` composed as on a cluster, its jobs run by submitit's local executor instead of sbatch."""
    sweep = tmp_path / "multirun"
    cache = tmp_path / "cache"
    tiny = [
        "model.llama.hidden_size=32", "model.llama.intermediate_size=64", "model.llama.num_hidden_layers=1",
        "model.llama.num_attention_heads=2", "model.llama.num_key_value_heads=1",
        "data.max_files=20", "data.vocab_size=300", "data.seq_len=32", "data.batch_size=2",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "callbacks.progress_bar=null", "callbacks.memory_monitor=null", "trainer.enable_model_summary=false",
    ]
    command = [
        str(Path(sys.executable).parent / "lomo-train"), "-m", "launcher=slurm", "hydra/launcher=submitit_local",
        "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
        f"data.cache_dir={cache}", *tiny, "method=lomo,adalomo",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    jobs = sorted(p.parent for p in sweep.glob("*/config.yaml"))
    assert [OmegaConf.load(job / "config.yaml").method.optimizer._target_ for job in jobs] == [
        "lomo_lightning.Lomo", "lomo_lightning.AdaLomo"
    ]
    assert all((job / "model" / "config.json").is_file() for job in jobs), "each job trained and saved its model"
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2, "submitit ran both jobs and kept their results"
