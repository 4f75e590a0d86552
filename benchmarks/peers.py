"""Peers side by side: memory and step time of fused AdaLomo against other low-memory training methods.

One command measures every method on the real SmolLM2-135M-Instruct, each in a fresh process (this script
re-invoked with ``--worker``), all on the same fixed batch of real text (2 x 256 tokens of the Python
standard library's source, tokenized by the model's own tokenizer), fp32, activation checkpointing on::

    python benchmarks/peers.py                                   # everything, ~50 min on one core here
    python benchmarks/peers.py --methods floor adalomo badam     # a subset, merged into the previous results
    python benchmarks/peers.py --seq 32 --timed-steps 1 --tag check    # does every method run? a few minutes

Per method it records what ``benchmarks/memory_speed.py`` records (the harness's ``memory.measure``): the MemTracker peak
of one step split into parameters, gradients, optimizer state, activations and temporaries, and the median
step time of the timed steps after warm-up, as a ratio to the *floor*: the same forward and backward with
every gradient dropped the moment it is ready and no update. The floor runs first and again last; its step
time is the median of both runs' steps, and the two runs show how much the machine drifted meanwhile.

The peers come from their PyPI packages (``pip install -e .[peers]``; see ``pyproject.toml`` for how to keep
pip from replacing torch), used as their own code or documentation uses them:

- ``lomo-optim``: ``Lomo`` / ``AdaLomo`` with ``fused_backward`` (``torch.Tensor.cuda`` mapped to a no-op: the
  package hard-codes ``.cuda()``);
- ``torch-optimi``: ``AdamW(gradient_release=True)`` + ``prepare_for_gradient_release``, in fp32, and in bf16
  with Kahan summation (bf16 matmuls are slow on CPUs without bf16 units: few steps, and its own bf16 floor);
- ``torchtune``: one ``torch.optim.AdamW`` per parameter, stepped in backward by
  ``torchtune.training.register_optim_in_bwd_hooks`` (its full fine-tuning recipes' ``optimizer_in_bwd``).
  torchtune 0.6.1 imports a torchao of at most 0.14, which peft refuses: give it one of its own, used by its
  worker alone, with ``pip install --no-deps --target DIR torchao==0.14.1`` and ``--torchtune-torchao DIR``;
- ``galore-torch`` / ``apollo-torch``: layer-wise, as transformers' Trainer sets up ``galore_adamw_layerwise``
  / ``apollo_adamw_layerwise`` (one optimizer per parameter in a post-accumulate-grad hook; low rank on the
  attention and MLP matrices, rank 128); GaLore also as its repository's ``galore_adamw8bit_per_layer``
  (8-bit GaLore-AdamW and bitsandbytes ``Adam8bit``);
- ``adam-mini``: ``Adam_mini(named_parameters, dim, n_heads, n_kv_heads)``, a standard step;
- ``badam``: ``BlockOptimizer`` over AdamW, one transformer block trained at a time (its defaults);
- ``peft``: LoRA rank 8 on every linear of every block, AdamW on the adapters.

A method that fails (an import, CPU-only code paths, this torch) is recorded with its exception text. Each
result also counts the parameters that the measured steps changed, so a method that silently trains
nothing, or trains only a part of the model per step (BAdam, LoRA), shows it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness import memory, readme
from harness.env import environment, mib, quiet, write
from harness.methods import floor, loss_of, smollm2


@dataclass(frozen=True)
class Method:
    label: str
    package: str  # where the code that trains comes from
    full_parameter: bool  # every parameter can change in every step: what the memory target compares with
    bf16: bool = False


# (package, full_parameter, bf16) by method; the labels are the README's (readme.PEER_LABELS)
METHODS: dict[str, Method] = {name: Method(readme.PEER_LABELS[name], *facts) for name, facts in {
    "floor": ("-", True), "adalomo": ("lomo-lightning", True), "lomo": ("lomo-lightning", True), "adamw": ("torch", True),
    "lomo_optim_lomo": ("lomo-optim", True), "lomo_optim_adalomo": ("lomo-optim", True), "optimi_adamw": ("torch-optimi", True),
    "torchtune_adamw": ("torchtune", True), "galore_layerwise": ("galore-torch", True),
    "galore8bit_layerwise": ("galore-torch + bitsandbytes", True), "apollo_layerwise": ("apollo-torch", True),
    "adam_mini": ("adam-mini", True), "badam": ("badam", False), "lora": ("peft", False), "floor_bf16": ("-", True, True),
    "optimi_adamw_bf16_kahan": ("torch-optimi", True, True), "floor_repeat": ("-", True),
}.items()}

OURS = ("adalomo", "lomo")
FLOORS = ("floor", "floor_repeat")

# AdamW-family peers at a fine-tuning LR; ours at memory_speed.py's 1e-3. The LR does not change the work of a
# step; it only has to keep a few steps of a pretrained model finite.
PEER_LR = 1e-5
LOW_RANK = dict(rank=128, update_proj_gap=200, proj_type="std")  # transformers' defaults for both
GALORE = dict(LOW_RANK, scale=0.25)
APOLLO = dict(LOW_RANK, proj="random", scale_type="channel", scale=1.0)



def real_text_batch(batch: int, seq: int):
    """``batch`` rows of ``seq`` tokens: the standard library's source files, in their fixed order, tokenized."""
    from transformers import AutoTokenizer

    from lomo_lightning.data.stdlib import stdlib_source_files
    from lomo_lightning.models import smollm2_directory

    tokenizer = AutoTokenizer.from_pretrained(smollm2_directory())
    ids: list[int] = []
    for path in stdlib_source_files():
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= batch * seq:
            break
    import torch

    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def state_tensors(optimizers) -> list:
    """Every tensor an optimizer keeps, including those inside state objects (GaLore's projection matrices),
    which MemTracker's own walk over ``optimizer.state`` does not see."""
    import torch

    found = []
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    found.append(value)
                elif hasattr(value, "__dict__"):
                    found += [v for v in vars(value).values() if isinstance(v, torch.Tensor)]
    return found


def standard(model, optimizer):
    def step(batch):
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, [optimizer], lambda: state_tensors([optimizer])


def backward_only(model, optimizers):
    """A step of a method whose optimizers run inside backward, from hooks the method installed."""

    def step(batch):
        loss_of(model, batch).backward()

    return step, list(optimizers), lambda: state_tensors(optimizers)


def low_rank_targets(model) -> set:
    """The weights GaLore and APOLLO project: every linear in attention and MLP (``optim_target_modules``
    ``["self_attn", "mlp"]``), as their READMEs and transformers' docs configure Llama."""
    import torch

    return {
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ("self_attn" in name or "mlp" in name)
    }


def layerwise(model, make_optimizer: Callable) -> list:
    """One optimizer per parameter, stepped and zeroed in its post-accumulate-grad hook: transformers'
    ``_setup_low_rank_optimizer`` for ``*_layerwise`` optimizers, and GaLore's ``*_per_layer``."""
    targets = low_rank_targets(model)
    optimizers = {p: make_optimizer(p, p in targets) for p in model.parameters() if p.requires_grad}

    def hook(param):
        if param.grad is not None:
            optimizers[param].step()
            optimizers[param].zero_grad()

    for param in optimizers:
        param.register_post_accumulate_grad_hook(hook)
    return list(optimizers.values())


def build_peer(method: str, model) -> tuple[Callable, list, Callable]:
    """``(step(batch), optimizers, state())`` for MemTracker, for a peer; raises whatever the peer raises."""
    import torch

    if method == "lomo_optim_lomo":
        from lomo_optim import Lomo

        optimizer = Lomo(model, lr=1e-3)
        return (lambda batch: optimizer.fused_backward(loss_of(model, batch), 1e-3)), [], list

    if method.startswith("optimi_adamw"):
        from optimi import AdamW, prepare_for_gradient_release

        optimizer = AdamW(model.parameters(), lr=PEER_LR, kahan_sum=method.endswith("kahan"), gradient_release=True)
        prepare_for_gradient_release(model, optimizer)
        return backward_only(model, [optimizer])

    if method == "torchtune_adamw":
        from torchtune import training

        optimizers = {p: torch.optim.AdamW([p], lr=PEER_LR) for p in model.parameters()}
        training.register_optim_in_bwd_hooks(model=model, optim_dict=optimizers)
        return backward_only(model, optimizers.values())

    if method == "galore_layerwise":
        from galore_torch import GaLoreAdamW

        def galore(param, low_rank):
            return GaLoreAdamW([{"params": [param], **(GALORE if low_rank else {})}], lr=PEER_LR)

        return backward_only(model, layerwise(model, galore))

    if method == "galore8bit_layerwise":
        import bitsandbytes as bnb
        from galore_torch import GaLoreAdamW8bit

        # GaLoreAdamW8bit.step calls torch.cuda.synchronize() unconditionally; on this CPU it is a no-op
        torch.cuda.synchronize = lambda *args, **kwargs: None

        def galore8bit(param, low_rank):
            if low_rank:
                return GaLoreAdamW8bit([{"params": [param], **GALORE}], lr=PEER_LR)
            return bnb.optim.Adam8bit([param], lr=PEER_LR)

        return backward_only(model, layerwise(model, galore8bit))

    if method == "apollo_layerwise":
        from apollo_torch import APOLLOAdamW

        def apollo(param, low_rank):
            return APOLLOAdamW([{"params": [param], **(APOLLO if low_rank else {})}], lr=PEER_LR)

        return backward_only(model, layerwise(model, apollo))

    if method == "adam_mini":
        from adam_mini import Adam_mini

        config = model.config
        optimizer = Adam_mini(
            named_parameters=model.named_parameters(), lr=PEER_LR, dim=config.hidden_size,
            n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads, verbose=False,
        )
        return standard(model, optimizer)

    if method == "badam":
        from badam import BlockOptimizer

        optimizer = BlockOptimizer(
            base_optimizer=torch.optim.AdamW(model.parameters(), lr=PEER_LR),
            named_parameters_list=list(model.named_parameters()),
            switch_block_every=100, switch_mode="random", verbose=0,
        )
        step, _, _ = standard(model, optimizer)
        # the state is the base optimizer's, and the fp32 copy of the active block it updates
        return step, [optimizer.base_optimizer], lambda: state_tensors([optimizer.base_optimizer]) + list(optimizer.param_idx2hp.values())

    raise ValueError(f"unknown method {method}")


def fingerprint(model) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def worker(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    quiet(spec["threads"])
    entry = METHODS[method]
    model = smollm2("bfloat16" if entry.bf16 else "float32", checkpointing=True)
    batch = real_text_batch(spec["batch"], spec["seq"])
    if method.startswith("floor") or method in ("adamw", "lora", "lomo_optim_adalomo", *OURS):
        from memory_speed import method_on  # memory_speed.py's own methods (lomo-train's builders), unchanged

        built = floor(model) if method.startswith("floor") else method_on(method, model, dict(lora_rank=spec["lora_rank"]))
        model, step, optimizers, state = built.model, built.step, built.optimizers, built.state
    else:
        step, optimizers, state = build_peer(method, model)
    before = fingerprint(model)
    steps = spec["bf16_steps"] if entry.bf16 else spec
    measured = memory.measure(model, step, batch, optimizers, state, warmup=steps["warmup"], timed=steps["timed"])
    after = fingerprint(model)
    return {"method": method, "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_now": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameter_tensors": len(before), "changed_tensors": sum(a != b for a, b in zip(before, after)),
            "finite": all(math.isfinite(x) for x in after), **measured}


# ---------------------------------------------------------------------------------------------------------
# driver: every method in a fresh process, then the table, the targets and the plots


def floor_time(by_method: dict[str, dict[str, Any]], bf16: bool) -> float | None:
    runs = ["floor_bf16"] if bf16 else list(FLOORS)
    times = [t for m in runs for t in by_method.get(m, {}).get("step_times_s", [])]
    return statistics.median(times) if times else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by_method = {r["method"]: r for r in rows if "error" not in r}
    for row in rows:
        if "error" in row:
            continue
        bf16 = METHODS[row["method"]].bf16
        floor = by_method.get("floor_bf16" if bf16 else "floor")
        if floor:
            row["peak_over_floor"] = row["peak_bytes"] / floor["peak_bytes"]
        time_floor = floor_time(by_method, bf16)
        if time_floor and "step_time_s" in row:
            row["step_over_floor"] = row["step_time_s"] / time_floor


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets: fused AdaLomo's peak below every full-parameter peer's, within 1.05x of the floor;
    its step time within 1.10x of the floor."""
    by_method = {r["method"]: r for r in rows if "error" not in r}
    ours = by_method.get("adalomo")
    checks: list[dict[str, Any]] = []
    memory.check(checks, "AdaLomo peak / floor", ours and ours.get("peak_over_floor"), 1.05)
    memory.check(checks, "AdaLomo step time / floor", ours and ours.get("step_over_floor"), 1.10)
    for method, entry in METHODS.items():
        row = by_method.get(method)
        if entry.full_parameter and method not in (*OURS, *FLOORS, "floor_bf16") and row and ours and not entry.bf16:
            memory.check(checks, f"AdaLomo peak / {entry.label}", ours["peak_bytes"] / row["peak_bytes"], 1.0, strict=True)
    return checks


def number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(spec: dict[str, Any], rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    header = ("| method | package | updates per step | peak (MiB) | params | grads | opt state | activations | temps "
              "| other | peak / floor | step (s, median) | step / floor | changed tensors |")
    lines = [header, "|" + "---|" * 14]
    for row in rows:
        entry = METHODS[row["method"]]
        if "error" in row:
            lines.append(f"| {entry.label} | {entry.package} | | failed: {row['error']} |" + " |" * 10)
            continue
        c = row["peak_by_category_bytes"]
        updates = "all" if entry.full_parameter else f"{row['trainable_now'] / row['parameters']:.1%} of the weights"
        if row["method"].startswith("floor"):
            updates = "none"
        lines.append(
            f"| {entry.label} | {entry.package} | {updates} | {mib(row['peak_bytes']):.1f} | "
            + " | ".join(f"{mib(c[k]):.1f}" for k in memory.CATEGORIES)
            + f" | {number(row.get('peak_over_floor'), 3)} | {number(row.get('step_time_s'), 2)} "
            f"| {number(row.get('step_over_floor'), 2)} | {row['changed_tensors']}/{row['parameter_tensors']} |"
        )
    target_lines = memory.targets_table(checks)
    setting = (
        f"SmolLM2-135M-Instruct (134.5M parameters, tied embeddings), fp32 unless marked bf16, batch {spec['batch']} x "
        f"{spec['seq']} tokens of real text, activation checkpointing on for every method; {spec['warmup']} warm-up + "
        f"{spec['timed']} timed steps ({spec['bf16_steps']['warmup']} + {spec['bf16_steps']['timed']} in bf16), "
        f"{spec['threads']} torch thread(s) per process; step / floor against the median of both floor runs' steps "
        "(bf16: the bf16 floor)"
    )
    return "\n".join([f"Setting: {setting}.", "", *lines, "", *target_lines, ""])


def write_results(name: str, spec: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    add_ratios(rows)
    checks = evaluate_targets(rows)
    table = markdown(spec, rows, checks)
    write(f"peers_{name}", {"spec": spec, "environment": environment(), "lr": {"ours": 1e-3, "peers": PEER_LR},
                            "galore": GALORE, "apollo": APOLLO, "results": rows, "targets": checks},
          table, f"Peers side by side ({name})")
    memory.plot(f"peers_{name}", rows, {m: e.label for m, e in METHODS.items()})
    return table


def main() -> None:
    if memory.worker_main(worker):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--bf16-timed-steps", type=int, default=1, help="bf16 steps are ~20x slower on CPUs without bf16 units")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (1: steadier on a shared machine)")
    parser.add_argument("--jobs", type=int, default=1, help="methods measured at once: memory is exact either way, step times only with 1")
    parser.add_argument("--torchtune-torchao", metavar="DIR", help="a directory holding torchao<=0.14 for torchtune's worker alone")
    parser.add_argument("--tag", default="smollm2", help="results go to benchmarks/results/peers_<tag>.*")
    args = parser.parse_args()
    spec = dict(batch=args.batch, seq=args.seq, warmup=args.warmup_steps, timed=args.timed_steps, threads=args.threads,
                bf16_steps=dict(warmup=0, timed=args.bf16_timed_steps), lora_rank=8)

    def env(method: str) -> dict[str, str] | None:  # torchtune's torchao, first on its worker's path alone
        if method != "torchtune_adamw" or not args.torchtune_torchao:
            return None
        return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.torchtune_torchao, os.environ.get("PYTHONPATH")]))}

    memory.run_methods(__file__, args.methods, spec, list(METHODS), f"peers_{args.tag}",
                       lambda rows: write_results(args.tag, spec, rows), args.jobs, env)


if __name__ == "__main__":
    main()
