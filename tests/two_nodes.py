"""One "node" of a two-node run on this machine: ``NODE_RANK=<0|1> MASTER_ADDR=127.0.0.1 MASTER_PORT=<port> python
tests/two_nodes.py OUT_DIR STRATEGY``, started twice (tests/test_two_nodes.py).

This is how Lightning runs on a cluster without a scheduler it knows: the same script on every node, which
reads ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with ``Trainer(num_nodes=2, devices=1)`` each node is
one process, and the two form one gloo group. Each node trains ``tiny_llama()`` with AdaLomo on its half of
every global batch of ``distributed_runs.global_batches()``; node 0 writes the full parameters to
``OUT_DIR/<strategy>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # conftest helpers; the package even without an install

import torch  # noqa: E402
from distributed_runs import TinyLM, full_state, global_batches, rank_slice  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def main() -> None:
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    module = TinyLM("adalomo")
    data = [rank_slice(batch, int(os.environ["NODE_RANK"])) for batch in global_batches()]
    trainer = Trainer(
        accelerator="cpu",
        num_nodes=2,
        devices=1,
        strategy=strategy,
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out / f"node{os.environ['NODE_RANK']}"),
    )
    trainer.fit(module, DataLoader(data, batch_size=None))
    params, _ = full_state(strategy, module, trainer.optimizers[0])
    if trainer.global_rank == 0:
        ranks = (trainer.global_rank, trainer.world_size, trainer.num_nodes, trainer.num_devices)
        torch.save({"params": params, "global_step": trainer.global_step, "ranks": ranks}, out / f"{strategy}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    main()
