"""Peak memory and step time of every training method on the same model and batch, each built as ``lomo-train``
builds it (``harness.methods``: ``conf/`` with the overrides in ``METHODS``), each in a fresh process::

    python benchmarks/memory_speed.py --preset tiny          # < 1 minute, to check that everything runs
    python benchmarks/memory_speed.py --preset small         # ~110M-parameter Llama, as in the LOMO paper
    python benchmarks/memory_speed.py --preset small --methods floor adamw adalomo
    python benchmarks/memory_speed.py --sweep-size           # peak memory vs parameter count, AdamW vs AdaLomo
    python benchmarks/memory_speed.py --preset long --methods floor adamw adalomo --loss-chunk-tokens 512 --tag chunked
    python benchmarks/memory_speed.py --preset smollm2 --methods floor lora sft_ag sft_sm3   # the real model, LoRA's budget

Per method: the MemTracker peak split by category, the process's peak RSS, the median step time after warm-up,
tokens/s; against the *floor* (the same forward and backward, gradients dropped, no update). Random token ids.
"""

from __future__ import annotations

import argparse
from typing import Any

from harness import memory, readme
from harness.env import environment, figure, mib, quiet, save, write
from harness.memory import peak_by_category, skip_frozen_parameters  # noqa: F401  # dpo.py imports them from here
from harness.methods import Method, build, floor, llama, lora, lora_parameter_count, smollm2

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=176, vocab=1024, batch=2, seq=64,
                 checkpointing=True, warmup=2, timed=5, lora_rank=1),
    # many tokens per step for a narrow model: the logits outgrow the LM head, the case of --loss-chunk-tokens
    "long": dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=32000, batch=4, seq=1024,
                 checkpointing=True, warmup=1, timed=3, lora_rank=8),
    "smollm2": dict(pretrained="SmolLM2-135M-Instruct", vocab=49152, batch=2, seq=128,
                    checkpointing=False, warmup=1, timed=3, lora_rank=8),
    "small": dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000, batch=2, seq=256,
                  checkpointing=True, warmup=1, timed=3, lora_rank=8),
}
FUSED = ["method.optimizer.lr=1e-3", "method.gradient_clip_val=null"]  # no clipping: one backward pass for every method
METHODS: dict[str, tuple[str, list[str] | None]] = {  # label, lomo-train's overrides (None: built here)
    "floor": ("floor (backward, grads dropped, no update)", None),
    "adamw": ("AdamW (standard)", ["method=adamw", *FUSED]),
    "sgd": ("SGD (standard)", ["method=adamw", *FUSED, "method.optimizer._target_=torch.optim.SGD", "~method.optimizer.betas"]),
    "lomo": ("LOMO (fused SGD)", ["method=lomo", *FUSED]),
    "adalomo": ("AdaLomo (fused)", ["method=adalomo", *FUSED]),
    "adalomo_hft": ("AdaLomo + HFT (fused)", ["method=adalomo", "selection=hft", *FUSED]),
    "sft_ag": ("SFT-AG + SFTAdamW (fused), LoRA's budget", ["selection=sft_ag", *FUSED]),
    "sft_sm3": ("SFT-MA + SM3 (fused), LoRA's budget", ["selection=sft_sm3", *FUSED]),
    "lora": ("LoRA + AdamW (peft)", None),
    "lomo_optim_adalomo": ("AdaLomo (reference lomo-optim)", None),
}
LABELS = {name: label for name, (label, _) in METHODS.items()}


def chunked_loss(chunk_tokens: int | None) -> Any:
    from harness.methods import loss_of

    def loss(model: Any, batch: Any) -> Any:
        from lomo_lightning import chunked_causal_lm_loss

        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the LM
        return chunked_causal_lm_loss(base, batch, batch, chunk_tokens=chunk_tokens)

    return loss if chunk_tokens else loss_of


def method_on(name: str, model: Any, spec: dict[str, Any]) -> Method:
    """``name`` on ``model``: from ``conf/`` as lomo-train builds it, or the floor, LoRA, the reference."""
    loss = chunked_loss(spec.get("loss_chunk_tokens"))
    if name == "floor":
        return floor(model, loss)
    if name == "lora":
        return lora(model, spec["lora_rank"], loss=loss)
    if name == "lomo_optim_adalomo":
        import torch

        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]  # it hard-codes .cuda()
        from lomo_optim import AdaLomo

        opt = AdaLomo(model, lr=1e-3, loss_scale=None)  # fp32: no loss scaling, like the fused runs
        state = [*opt.exp_avg_sq.values(), *opt.exp_avg_sq_row.values(), *opt.exp_avg_sq_col.values()]
        return Method(model, lambda b: opt.fused_backward(loss(model, b), 1e-3), sum(p.numel() for p in model.parameters()),
                      state=lambda: state)
    overrides = list(METHODS[name][1] or [])
    if name.startswith("sft"):  # LoRA's budget; the tracked (last) step opens an AG window: the heaviest kind
        overrides += [f"selection.selector.num_tunable_weights={lora_parameter_count(model, spec['lora_rank'])}",
                      f"selection.selector.reselection_steps={spec['warmup'] + spec['timed'] + 1}",
                      "selection.selector.selection_accumulation_steps=1"]
    return build(model, overrides, loss=loss)


def worker(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    quiet(spec["threads"])
    model = smollm2(checkpointing=spec["checkpointing"]) if spec.get("pretrained") else llama(**spec)
    n_params = sum(p.numel() for p in model.parameters())
    method = method_on(name, model, spec)
    batch = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(1))
    measured = memory.measure(method.model, method.step, batch, method.optimizers, method.state,
                              warmup=spec["warmup"], timed=spec["timed"])
    return {"method": name, "parameters": n_params, "trainable": method.trainable, **measured}


def targets(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def ratio(a: str, b: str, key: str) -> float | None:
        return by[a][key] / by[b][key] if key in by.get(a, {}) and key in by.get(b, {}) else None

    checks: list[dict[str, Any]] = []
    memory.check(checks, "AdaLomo peak memory / floor", ratio("adalomo", "floor", "peak_bytes"), 1.05)
    memory.check(checks, "AdaLomo peak memory / AdamW", ratio("adalomo", "adamw", "peak_bytes"), 0.32)
    memory.check(checks, "AdaLomo step time / floor", ratio("adalomo", "floor", "step_time_s"), 1.10)
    memory.check(checks, "AdaLomo step time / AdamW", ratio("adalomo", "adamw", "step_time_s"), 1.0, strict=True)
    memory.check(checks, "AdaLomo step time / reference lomo-optim", ratio("adalomo", "lomo_optim_adalomo", "step_time_s"), 1.0)
    memory.check(checks, "HFT+AdaLomo step time / AdaLomo", ratio("adalomo_hft", "adalomo", "step_time_s"), 0.85)
    for sft in ("sft_ag", "sft_sm3"):
        memory.check(checks, f"{sft} peak memory / LoRA", ratio(sft, "lora", "peak_bytes"), 1.0)
        memory.check(checks, f"{sft} step time / LoRA", ratio(sft, "lora", "step_time_s"), 1.2)
    return checks


def table(rows: list[dict[str, Any]]) -> str:
    """Every row: peak by category, against the floor and AdamW, RSS, step time (also README figures)."""
    by = {r["method"]: r for r in rows if "error" not in r}
    lines = ["| method | trainable | peak (MiB) | params | grads | opt state | activations | temps | other | peak / floor "
             "| peak / AdamW | peak RSS (MiB) | step (s, median) | step / floor | tokens/s |", "|" + "---|" * 15]
    nan = float("nan")
    for row in rows:
        if "error" in row:
            lines.append(f"| {LABELS[row['method']]} | error: {row['error']} |" + " |" * 13)
            continue
        peak, step = row["peak_bytes"], row.get("step_time_s", nan)
        lines.append(
            f"| {LABELS[row['method']]} | {row['trainable']:,} | {mib(peak):.1f} | "
            + " | ".join(f"{mib(row['peak_by_category_bytes'][k]):.1f}" for k in memory.CATEGORIES)
            + f" | {peak / by['floor']['peak_bytes'] if 'floor' in by else nan:.3f}"
            f" | {peak / by['adamw']['peak_bytes'] if 'adamw' in by else nan:.3f} | {row['peak_rss_mib']:.0f} | {step:.3f}"
            f" | {step / by['floor'].get('step_time_s', nan) if 'floor' in by else nan:.2f} | {row.get('tokens_per_s', nan):.0f} |")
    return "\n".join(lines)


def describe(spec: dict[str, Any]) -> str:
    shape = (f"{spec['pretrained']} (pretrained)" if spec.get("pretrained") else f"Llama, hidden {spec['hidden']}, "
             f"{spec['layers']} layers, {spec['heads']} heads, intermediate {spec['intermediate']}")
    chunks = spec.get("loss_chunk_tokens")
    return (f"Model: {shape}, vocab {spec['vocab']} (tied embeddings), fp32, batch {spec['batch']} x {spec['seq']} random "
            f"tokens, activation checkpointing {'on' if spec['checkpointing'] else 'off'}, "
            + (f"LM head and loss in chunks of {chunks} tokens; " if chunks else "full logits; ")
            + f"{spec['warmup']} warm-up + {spec['timed']} timed steps, {spec['threads']} torch thread(s) per process.")


def write_preset(preset: str, name: str, spec: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    checks = targets({r["method"]: r for r in rows if "error" not in r})
    text = "\n".join([describe(spec), "", table(rows), "", *memory.targets_table(checks), ""])
    notes = {"methods": {m: overrides for m, (_, overrides) in METHODS.items()},
             "built": "lomo-train's config and builders (harness.methods.build); floor, LoRA (peft) and lomo-optim here",
             "data": "random token ids (memory and speed do not depend on the text)"}
    write(f"memory_speed_{name}", {"preset": preset, "spec": spec, "environment": environment(), "notes": notes,
                                   "results": rows, "targets": checks}, text, f"Memory and speed, preset `{preset}`")
    memory.plot(f"memory_speed_{name}", rows, LABELS)
    return text


SWEEP_SIZES = [(256, 4, 4, 688), (512, 8, 8, 1376), (768, 12, 12, 2048), (1024, 16, 16, 2752)]  # hidden, layers, heads, ffn


def run_sweep(threads: int) -> None:
    base = dict(PRESETS["small"], warmup=1, timed=0, threads=threads)
    rows = []
    for hidden, layers, heads, intermediate in SWEEP_SIZES:
        for method in ("adamw", "adalomo", "floor"):
            spec = dict(base, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate)
            rows.append(dict(memory.in_subprocess(__file__, method, spec), hidden=hidden, layers=layers))
    payload = {"spec": base, "sizes": SWEEP_SIZES, "results": rows}
    write("memory_sweep_size", payload, readme.sweep_table(payload), "Peak memory vs model size")
    fig, ax = figure(figsize=(7, 4.5))
    for method in ("adamw", "adalomo", "floor"):
        points = [(r["parameters"] / 1e6, mib(r["peak_bytes"]) / 1024) for r in rows if r["method"] == method and "error" not in r]
        ax.plot(*zip(*points), marker="o", label=LABELS[method])
    ax.set(xlabel="parameters (M)", ylabel="MemTracker peak (GiB)",
           title="Peak training memory vs model size (fp32, batch 2 x 256, checkpointing)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "memory_sweep_size")
    print(readme.sweep_table(payload))


def main() -> None:
    if memory.worker_main(worker):
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sweep-size", action="store_true", help="peak memory vs parameter count, AdamW vs AdaLomo")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: steadier on a shared machine)")
    parser.add_argument("--timed-steps", type=int, help="override the preset's number of timed steps")
    parser.add_argument("--warmup-steps", type=int, help="override the preset's number of warm-up steps")
    parser.add_argument("--tag", help="write memory_speed_<preset>_<tag>.* instead (e.g. a repeat of the timing)")
    parser.add_argument("--loss-chunk-tokens", type=int, help="every method computes the LM head and loss this many tokens at a time")
    args = parser.parse_args()
    if args.sweep_size:
        return run_sweep(args.threads)
    spec = dict(PRESETS[args.preset], threads=args.threads, loss_chunk_tokens=args.loss_chunk_tokens)
    spec["timed"] = spec["timed"] if args.timed_steps is None else args.timed_steps
    spec["warmup"] = spec["warmup"] if args.warmup_steps is None else args.warmup_steps
    name = args.preset if args.tag is None else f"{args.preset}_{args.tag}"
    memory.run_methods(__file__, args.methods, spec, list(METHODS), f"memory_speed_{name}",
                       lambda rows: write_preset(args.preset, name, spec, rows))


if __name__ == "__main__":
    main()

