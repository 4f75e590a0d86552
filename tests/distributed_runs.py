"""Runs named cases on 2 CPU ranks (gloo) through Lightning; rank 0 writes the results for tests/test_distributed.py.

Usage: ``python tests/distributed_runs.py OUT_DIR CASE [CASE ...]``; ``python tests/distributed_runs.py --compiled OUT_DIR``
runs :func:`run_compiled_shards` alone (rank 0 in this process, rank 1 spawned; no Lightning). Lightning re-launches this script for
rank 1, so every rank runs the same cases in the same order. Each case trains ``tiny_llama()`` on rank r's
half of every global batch of ``global_batches()`` and writes ``OUT_DIR/CASE.pt``: the full parameters
(gathered from shards), the full optimizer state, and each rank's local optimizer-state bytes.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # conftest helpers; the package even without an install

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import batches, preference_pairs, tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from lightning.pytorch import LightningDataModule, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lomo_lightning import SM3, AdaLomo, FusedOptimizationMixin, Lomo, SFTAdamW  # noqa: E402
from lomo_lightning.callbacks import HFTResampleCallback, SFTReselectionCallback  # noqa: E402
from lomo_lightning.data import PreferenceCollator, PreferencePairs  # noqa: E402
from lomo_lightning.dpo_module import FusedDPOModule  # noqa: E402
from lomo_lightning.objectives import DPOObjective, sequence_log_probs  # noqa: E402
from lomo_lightning.objectives.causal_lm import chunked_causal_lm_loss  # noqa: E402
from lomo_lightning.selection import HalfFineTuning, SparseFineTuning  # noqa: E402
from lomo_lightning.strategies import LomoFSDPStrategy, save_pretrained_consolidated  # noqa: E402

WORLD = 2
STEPS = 3
RULES = {
    "adalomo": lambda params: AdaLomo(params, lr=1e-2, weight_decay=0.01),
    "lomo": lambda params: Lomo(params, lr=0.05, weight_decay=0.01),
    "sftadamw": lambda params: SFTAdamW(params, lr=1e-2, weight_decay=0.01),
    "sm3": lambda params: SM3(params, lr=1e-2, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),  # unfused, under strategy="lomo_fsdp_unfused"
}
CLIP = 0.05
SFT_DENSITY = 0.05


def intermediate_size(flags: set[str]) -> int:
    """``odd``: 37 MLP channels, so that rows (gate/up) and columns (down) split unevenly over 2 ranks."""
    return 37 if "odd" in flags else 64


def add_unused_parameter(model: torch.nn.Module) -> None:
    """``unused``: a trainable parameter that never gets a gradient, registered last in the first block."""
    model.model.layers[0].post_attention_layernorm.register_parameter("unused", torch.nn.Parameter(torch.ones(8)))


def make_sft(flags: set[str]) -> SparseFineTuning | None:
    """``sft``: sparse deltas; ``ag``: accumulated-gradient regrowth (else SM3's); ``resel``: reselect after steps 1 and 4.

    With ``resel`` the AG windows are step 1 and steps 3..4: a 3-step run ends inside the second.
    """
    if "sft" not in flags:
        return None
    resel = "resel" in flags
    return SparseFineTuning(
        density=SFT_DENSITY,
        regrowth="accumulated_gradients" if "ag" in flags else "sm3",
        reselection_steps=3 if resel else 10**6,
        selection_accumulation_steps=1 if resel else 10**5,
        total_steps=10,  # fixed, so that the prune schedule of a 3-step run is that of a 6-step one
    )


def global_batches(n: int = STEPS) -> list[dict[str, torch.Tensor]]:
    return batches(n, batch_size=2 * WORLD)


def rank_slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    size = next(iter(batch.values())).shape[0] // WORLD
    return {key: value[rank * size : (rank + 1) * size] for key, value in batch.items()}


def objective(flags: set[str]) -> DPOObjective | None:
    """``dpo``: the DPO loss on pairs (``ipo``: the IPO loss) instead of the causal-LM loss."""
    if "dpo" not in flags:
        return None
    return DPOObjective(beta=0.5, loss_type="ipo" if "ipo" in flags else "sigmoid")


def global_pair_batches(model: torch.nn.Module, n: int = STEPS) -> list[dict[str, torch.Tensor]]:
    """``2 * WORLD`` pairs a batch (chosen rows, then rejected rows), with ``model``'s log-probabilities as reference."""
    collate = PreferenceCollator(pad_token_id=0)
    pairs = preference_pairs(n * 2 * WORLD, seed=7)
    out = []
    for step in range(n):
        batch = collate(pairs[step * 2 * WORLD : (step + 1) * 2 * WORLD])
        with torch.no_grad():
            batch["reference_logps"] = sequence_log_probs(
                model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"]
            )
        out.append(batch)
    return out


def pair_slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s pairs: its share of the chosen rows and the same pairs' rejected rows."""
    pairs = batch["input_ids"].shape[0] // 2
    size = pairs // WORLD
    rows = [*range(rank * size, (rank + 1) * size), *range(pairs + rank * size, pairs + (rank + 1) * size)]
    return {key: value[rows] for key, value in batch.items()}


def case_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], flags: set[str], chunk_tokens: int | None = None):
    dpo = objective(flags)
    if dpo is not None:
        return dpo(model, batch, chunk_tokens).losses.mean()
    if chunk_tokens is not None:
        return chunked_causal_lm_loss(model, chunk_tokens=chunk_tokens, **batch)
    return model(**batch).loss


class TinyLM(LightningModule):
    def __init__(
        self,
        rule: str,
        hft: bool = False,
        sft: SparseFineTuning | None = None,
        nan_at: tuple[int, int] | None = None,
        seed: int = 0,
        tie: bool = False,
        intermediate: int = 64,
    ):
        super().__init__()
        self.model = tiny_llama(seed=seed, tie=tie, intermediate=intermediate)
        self.sft = sft.apply(self.model) if sft is not None else None
        self.hft = HalfFineTuning(ratio=0.5, seed=0) if hft else None
        if self.hft is not None:
            self.hft.apply(self.model)
        self.rule = rule
        self.loss_chunk_tokens = None
        self.flags: set[str] = set()
        self.nan_at = nan_at  # (rank, batch index) whose loss becomes NaN
        self.resample = False

    def compute_loss(self, batch):
        return case_loss(self.model, batch, self.flags, self.loss_chunk_tokens)

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        if self.nan_at == (self.global_rank, batch_idx):
            loss = loss * float("nan")
        return loss

    def on_train_end(self):
        updater = getattr(self.trainer.strategy, "fused_updater", None)  # None: the unfused baseline
        self.skipped_steps = updater.skipped_steps if updater is not None else 0
        # what stays behind as gradients: nothing under FSDP; DDP's zeroed bucket views under DDP
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.leftover_grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        self.leftover_grads_zero = all(bool((g == 0).all()) for g in grads)

    def configure_optimizers(self):
        if self.sft is not None:
            return RULES[self.rule](self.sft.parameters())
        if self.resample:  # newly trainable parameters must already be in the optimizer
            return RULES[self.rule](self.parameters())
        return RULES[self.rule]([p for p in self.parameters() if p.requires_grad])


class TinyFusedLM(FusedOptimizationMixin, TinyLM):
    """Manual optimization through the mixin."""


class ManuallyShardedLM(TinyFusedLM):
    """Shards itself in configure_model: the strategy must leave it as it is."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for layer in self.model.model.layers:
            fully_shard(layer, mesh=self.device_mesh)
        fully_shard(self.model, mesh=self.device_mesh)


class RandomPreferencePairs(PreferencePairs, LightningDataModule):
    """Pairs of random ids as a preference data module: DPOModule attaches their reference log-probabilities."""

    TRAIN, VAL, BATCH = 11, 5, 3  # 4 train batches (the last one short), 2 val batches

    def __init__(self, cache_dir: Path):
        super().__init__()
        self.cache_dir, self.batch_size = cache_dir, self.BATCH
        self.train_dataset = self.val_dataset = None

    def setup(self, stage: str) -> None:
        self.train_dataset = Dataset.from_list(preference_pairs(self.TRAIN, seed=3))
        self.val_dataset = Dataset.from_list(preference_pairs(self.VAL, seed=4))

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(pad_token_id=0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, collate_fn=self.collator())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=self.collator())


def run_reference(case: str, out: Path) -> None:
    """``reference``: FusedDPOModule on a preference data module; every rank's reference values are saved."""
    spec = parse(case)
    module = FusedDPOModule(tiny_llama(), optimizer=RULES[spec["rule"]], beta=0.5)
    datamodule = RandomPreferencePairs(out / f"{case}-cache")
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=spec["strategy"],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out / case),
    )
    trainer.fit(module, datamodule)
    values = {split: torch.tensor(getattr(datamodule, f"{split}_dataset")["reference_logps"]) for split in ("train", "val")}
    per_rank = [None] * WORLD
    dist.all_gather_object(per_rank, values)
    if trainer.global_rank == 0:
        torch.save({"per_rank": per_rank, "global_step": trainer.global_step}, out / f"{case}.pt")


def parse(case: str) -> dict:
    """``fsdp_adalomo_clip_hft`` -> strategy, rule and flags; ``fsdp2_adamw``: the unfused FSDP2 baseline."""
    placement, rule, *flags = case.split("_")
    strategy = "lomo_fsdp_unfused" if placement == "fsdp2" else f"lomo_{placement}"
    return {"strategy": strategy, "rule": rule, "flags": set(flags)}


def full_state(strategy: str, module: TinyLM, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    params = get_model_state_dict(module.model, options=options)
    if strategy in ("lomo_fsdp", "lomo_fsdp_unfused"):
        optim = get_optimizer_state_dict(module.model, optimizer, options=options).get("state")  # on rank 0
    else:
        optim = named_state(module.model, optimizer)
    return params, optim


def named_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state keyed by parameter name (as distributed checkpointing keys it)."""
    return {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}


def local_state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def run(case: str, out: Path) -> None:
    spec = parse(case)
    flags = spec["flags"]
    resume = "resume" in flags
    epochs = 2 if ("long" in flags or resume) else 1
    nan_at = (1, 1) if "nan" in flags else None
    module_cls = ManuallyShardedLM if "manual" in flags else TinyFusedLM if "mixin" in flags else TinyLM
    module = module_cls(spec["rule"], hft="hft" in flags, sft=make_sft(flags), tie="tie" in flags, nan_at=nan_at, seed=123 if resume else 0,
        intermediate=intermediate_size(flags),
    )
    if "unused" in flags:
        add_unused_parameter(module.model)
    module.flags = flags
    if "chunked" in flags:
        module.loss_chunk_tokens = 5
    rank_for_data = int(os.environ.get("LOCAL_RANK", 0))
    if "dpo" in flags:
        reference = tiny_llama(tie="tie" in flags, intermediate=intermediate_size(flags))
        data = [pair_slice(b, rank_for_data) for b in global_pair_batches(reference)]
    else:
        data = [rank_slice(b, rank_for_data) for b in global_batches()]
    callbacks = []
    checkpoint_dir = out / f"{case}-ckpt"
    if "resample" in flags:
        module.resample = True
        callbacks.append(HFTResampleCallback(module.hft, every_n_steps=1))
    if module.sft is not None:
        callbacks.append(SFTReselectionCallback(module.sft))
    if "save" in flags:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True))
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=LomoFSDPStrategy(save_distributed_checkpoint=False) if "full" in flags
        else LomoFSDPStrategy(unit="projection") if "proj" in flags else spec["strategy"],
        precision="bf16-mixed" if "bf16" in flags else "bf16-true" if "bf16true" in flags else "32-true",
        max_epochs=epochs,
        gradient_clip_val=CLIP if "clip" in flags else None,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing="save" in flags,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out / case),
    )
    ckpt_path = None
    if resume:
        source = case.replace("_resume", "_save")
        ckpt_path = str(out / f"{source}-ckpt" / "last.ckpt")
    trainer.fit(module, DataLoader(data, batch_size=None), ckpt_path=ckpt_path)
    optimizer = trainer.optimizers[0]
    params, optim = full_state(spec["strategy"], module, optimizer)
    sizes = [None] * WORLD
    dist.all_gather_object(sizes, local_state_bytes(optimizer))
    dtypes = sorted({str(p.dtype) for p in module.model.parameters()})
    if "export" in flags:
        save_pretrained_consolidated(trainer, out / f"{case}-hf")
        if module.sft is not None:
            module.sft.export_delta(out / f"{case}-delta.safetensors")
    if trainer.global_rank == 0:
        result = {
            "params": params,
            "optim": optim,
            "state_bytes": sizes,
            "global_step": trainer.global_step,
            "skipped_steps": module.skipped_steps,
            "leftover_grad_bytes": module.leftover_grad_bytes,
            "leftover_grads_zero": module.leftover_grads_zero,
            "dtypes": dtypes,
            "sft": module.sft.state_dict() if module.sft is not None else None,
        }
        torch.save(result, out / f"{case}.pt")


def compiled_rule(params):
    """The ``compiled`` case's rule: AdaLomo with its compiled kernels (the suite's ``auto`` is eager)."""
    return AdaLomo(params, lr=1e-2, weight_decay=0.01, compile=True)


def run_compiled_shards(rank: int, out: Path) -> None:
    """``compiled``: the fused AdaLomo step with ``compile=True`` on FSDP2 shards of ``tiny_llama(intermediate=37)``
    (uneven shards, so the ranks' kernels see other shapes), through :class:`ShardedFusedUpdater` directly, without
    Lightning (a cheap case). Rank 0 writes ``OUT/fsdp_adalomo_compiled.pt``: the full parameters after ``STEPS`` steps."""
    from torch.distributed.fsdp import fully_shard

    from lomo_lightning.strategies import ShardedFusedUpdater

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=WORLD, timeout=timedelta(minutes=4))
    try:
        model = tiny_llama(intermediate=37)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        updater = ShardedFusedUpdater(model, compiled_rule(model.parameters()))
        for batch in global_batches():
            assert updater.backward(model(**rank_slice(batch, rank)).loss)
        params = {name: param.full_tensor() for name, param in model.named_parameters()}
        if rank == 0:
            torch.save(params, out / "fsdp_adalomo_compiled.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "--compiled":
        import torch.multiprocessing as mp

        out = Path(sys.argv[2])
        other = mp.get_context("spawn").Process(target=run_compiled_shards, args=(1, out))
        other.start()
        run_compiled_shards(0, out)
        other.join()
        if other.exitcode != 0:
            raise SystemExit(f"rank 1 failed with exit code {other.exitcode}")
        return
    out = Path(sys.argv[1])
    for case in sys.argv[2:]:
        (run_reference if "reference" in parse(case)["flags"] else run)(case, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # exiting with a live gloo group costs seconds


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    main()
