"""Fused updates on FSDP2 shards: per-rank memory against one process, and step time against plain FSDP2 + AdamW.

    python benchmarks/distributed.py                 # 2 gloo ranks on CPU, ~1-2 minutes
    python benchmarks/distributed.py --layers 8 --hidden 512 --steps 10

Memory (per rank, measured on the live tensors after a step, each storage counted once): the local
parameter shards plus the local optimizer state, against the same model and rule in one process. Also
the MemTracker peak of one step split by category (parameters, gradients, optimizer state, activations).

Step time: the median over the timed steps of the slowest rank, for

- ``fsdp_adamw``: ``fully_shard`` + ``loss.backward(); AdamW.step(); zero_grad()``  (the reference);
- ``fsdp_fused_adamw``: the same AdamW, run per shard inside backward by ``ShardedFusedUpdater``
  (isolates the cost of the hooks);
- ``fsdp_fused_adalomo`` / ``fsdp_fused_lomo``: the fused rules this package is for;
- ``fsdp_fused_sft_adalomo``: sparse fine-tuning (1% of the parameters) with AdaLomo on the values,
  which stay replicated (out of ``fully_shard``); its memory counts the values (parameters) and their
  indices (buffers) too;
- ``ddp_adamw`` / ``ddp_fused_adalomo``: the same under DDP (``gradient_as_bucket_view=True``), where
  every rank holds everything and the gradients live in DDP's buckets.

Writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import methods
from harness.env import RESULTS

WORLD = 2
MODES = ("fsdp_adamw", "fsdp_fused_adamw", "fsdp_fused_adalomo", "fsdp_fused_lomo", "fsdp_fused_sft_adalomo", "ddp_adamw",
         "ddp_fused_adalomo")
SFT_DENSITY = 0.01


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


# each rule as conf/method builds it (lomo-train method=...), at these rates
RULES = {"adamw": ["method=adamw", "method.optimizer.lr=1e-4", "method.optimizer.weight_decay=0.01"],
         "adalomo": ["method=adalomo", "method.optimizer.lr=1e-3"], "lomo": ["method=lomo", "method.optimizer.lr=1e-3"]}


def make_optimizer(mode: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from lomo_lightning.preflight import checked_method

    factory, _ = checked_method(methods.compose(*RULES[mode.rsplit("_", 1)[-1]]).method, 1)
    return factory(params)


def local_bytes(tensors: list[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def state_tensors(optimizer: torch.optim.Optimizer, sft: Any = None) -> list[torch.Tensor]:
    """The optimizer's state, plus what sparse fine-tuning keeps besides the parameters (its indices)."""
    tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return tensors + methods.sft_state(sft) if sft is not None else tensors


def apply_sft(model: torch.nn.Module) -> Any:
    from lomo_lightning import SparseFineTuning

    # no reselection while timing: the regrowth rule only decides that no accumulated-gradient window is open
    return SparseFineTuning(density=SFT_DENSITY, regrowth="sm3").apply(model)


def batch(args: argparse.Namespace, rank: int, step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    return {"input_ids": ids, "labels": ids}


def tracker_peak(step_fn, *tracked) -> dict[str, int] | str:
    """MemTracker's peak of one step, by category; the error text if it cannot track this setup."""
    try:
        from harness.memory import skip_frozen_parameters, track_sparse_compressed_tensors
        from torch.distributed._tools.mem_tracker import MemTracker

        track_sparse_compressed_tensors()  # SFT's backward samples its gradients through a sparse CSR tensor
        tracker = MemTracker()
        for module in (t for t in tracked if isinstance(t, torch.nn.Module)):
            skip_frozen_parameters(tracker, module)  # SFT's frozen base
        tracker.track_external(*tracked)
        with tracker:
            step_fn()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
        return {str(k): int(v) for k, v in peak.items()}
    except Exception as error:  # a benchmark records what failed instead of dying
        return f"{type(error).__name__}: {error}"


def memory_of_one_process(args: argparse.Namespace) -> dict[str, Any]:
    """The same model and rules, whole, in one process."""
    from lomo_lightning import FusedUpdater

    out: dict[str, Any] = {}
    for rule in ("adalomo", "adamw", "sft_adalomo"):
        model = build_model(args)
        sft = apply_sft(model) if rule.startswith("sft") else None
        optimizer = make_optimizer(f"one_{rule}", sft.parameters() if sft is not None else list(model.parameters()))
        step = plain_step(model, optimizer, args, 0) if rule == "adamw" else fused_step(model, FusedUpdater(model, optimizer), args, 0)
        step(0)
        peak = tracker_peak(lambda: step(0), model, optimizer)
        params, state = local_bytes(list(model.parameters())), local_bytes(state_tensors(optimizer, sft))
        out[rule] = {"param_bytes": params, "optimizer_state_bytes": state, "params_plus_state": params + state, "tracker_peak": peak}
    return out


def plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace, rank: int):
    def step(i: int) -> None:
        model(**batch(args, rank, i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fused_step(model: torch.nn.Module, updater: Any, args: argparse.Namespace, rank: int):
    def step(i: int) -> None:
        updater.backward(model(**batch(args, rank, i)).loss)

    return step


def worker(rank: int, args: argparse.Namespace, rendezvous: str, result_file: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from lomo_lightning.strategies import ReplicatedFusedUpdater, ShardedFusedUpdater
    from lomo_lightning.strategies.fsdp import shard_transformers

    mesh = init_device_mesh("cpu", (WORLD,))
    steps: dict[str, Any] = {}
    trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, Any]] = {}
    for mode in args.modes:
        model = build_model(args)
        sft = apply_sft(model) if "sft" in mode else None
        wrapped: torch.nn.Module = model
        if mode.startswith("fsdp"):
            shard_transformers(model, mesh)
        else:
            wrapped = DistributedDataParallel(model, gradient_as_bucket_view=True)
        optimizer = make_optimizer(mode, sft.parameters() if sft is not None else list(model.parameters()))
        trained[mode] = (model, optimizer, sft)
        if "fused" not in mode:
            steps[mode] = plain_step(wrapped, optimizer, args, rank)
        elif mode.startswith("fsdp"):
            steps[mode] = fused_step(wrapped, ShardedFusedUpdater(model, optimizer, group=mesh.get_group()), args, rank)
        else:
            steps[mode] = fused_step(wrapped, ReplicatedFusedUpdater(wrapped, optimizer), args, rank)
    # modes take turns step by step, so that load from other processes on the machine hits them alike
    times: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for i in range(args.warmup + args.steps):
        for mode in args.modes:
            dist.barrier()
            start = time.perf_counter()
            steps[mode](i)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                times[mode].append(elapsed.item())
    results: dict[str, Any] = {}
    for mode, (model, optimizer, sft) in trained.items():
        peak = tracker_peak(lambda: steps[mode](0), model, optimizer)
        params, state = local_bytes(list(model.parameters())), local_bytes(state_tensors(optimizer, sft))
        grads_left = local_bytes([p.grad for p in model.parameters() if p.grad is not None])
        gathered: list[Any] = [None] * WORLD
        dist.all_gather_object(
            gathered,
            {"param_bytes": params, "optimizer_state_bytes": state, "grad_bytes_after_step": grads_left, "tracker_peak": peak},
        )
        results[mode] = {"median_step_s": statistics.median(times[mode]), "step_times_s": times[mode], "per_rank": gathered}
    if rank == 0:
        Path(result_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // WORLD))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--output", type=Path, default=RESULTS / "distributed.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    one = memory_of_one_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "ranks.json")
        rendezvous = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(worker, args=(args, rendezvous, result_file), nprocs=WORLD, join=True)
        ranks = json.loads(Path(result_file).read_text())

    summary: dict[str, Any] = {}
    for mode, run in ranks.items():
        worst = max(r["param_bytes"] + r["optimizer_state_bytes"] for r in run["per_rank"])
        rule = "adamw" if mode.endswith("adamw") else "sft_adalomo" if "sft" in mode else "adalomo" if mode.endswith("adalomo") else None
        entry = {"median_step_s": round(run["median_step_s"], 4), "per_rank_params_plus_state_bytes": worst}
        reference = f"{mode.split('_')[0]}_adamw"
        if reference in ranks:
            entry[f"step_time_vs_{reference}"] = round(run["median_step_s"] / ranks[reference]["median_step_s"], 3)
        if rule is not None:
            entry["per_rank_vs_one_process_same_rule"] = round(worst / one[rule]["params_plus_state"], 3)
        entry["per_rank_vs_one_process_adamw"] = round(worst / one["adamw"]["params_plus_state"], 3)
        entry["grad_bytes_left_after_step"] = max(r["grad_bytes_after_step"] for r in run["per_rank"])
        peaks = [r["tracker_peak"] for r in run["per_rank"]]
        if all(isinstance(p, dict) for p in peaks):
            entry["per_rank_tracker_peak_bytes"] = max(p["Total"] for p in peaks)
        summary[mode] = entry
    report = {
        "setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "world": WORLD, "backend": "gloo",
                  "device": "cpu", "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
        "one_process": one,
        "ranks": ranks,
        "summary": summary,
        "targets": {"fsdp per_rank_vs_one_process_same_rule": 0.6, "fsdp fused step_time_vs_fsdp_adamw": 1.10},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
