"""bf16 memory and speed on one accelerator (a CUDA GPU: ``gpu_check.sh``): the floor, AdamW and fused AdaLomo / LOMO,
eager and compiled (and AdaLomo with activation offloading), on SmolLM2-135M and a 1.1B Llama.

    python benchmarks/gpu_check.py            # ~3 minutes on one H100/H200 (benchmarks/gpu_check.sh runs it)

Per model and method, in this process one after another: the accelerator's ``max_memory_allocated`` over the timed
steps (after warm-up steps, so optimizer state exists) and the median step time by device events. bf16 weights
(``bf16-true``: AdaLomo/LOMO write back with stochastic rounding, the default), batch 4 x 512 random tokens,
activation checkpointing. Methods as ``lomo-train`` builds them (``harness.methods.build``), gradient clipping off (one
backward pass); the **floor** is forward and backward with every gradient dropped the moment it is ready, no update.
Results: ``benchmarks/results/gpu_check.{json,md}``.

``adalomo``/``lomo`` run the rules' compiled kernels (``compile=True``: Triton); ``adalomo_eager``/``lomo_eager`` the
eager reference (``compile=False``). A compiled method's warm-up steps pay its compilation, reported as ``warmup_s``
(the first warm-up step's time). Targets (the README's): fused AdaLomo's peak within 1.05x of the floor and step time
within 1.10x of it. ``adalomo_offload`` is fused AdaLomo under ``ActivationOffloading`` (what
``activation_offloading="auto"`` does on a GPU with checkpointing): the copies' real cost, which fake tensors
(``memory_scale.py``) cannot time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from harness import env, methods

METHODS = ["floor", "adamw", "adalomo", "adalomo_eager", "lomo", "lomo_eager", "adalomo_offload"]


def build(name: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2":
        return methods.smollm2("bfloat16", checkpointing=True).to(device)
    # TinyLlama-1.1B's shape, random weights
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, use_cache=False)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.activation_checkpointing_enable()
    return model.train()


def method_of(name: str, model: torch.nn.Module) -> methods.Method:
    if name == "floor":
        return methods.floor(model)
    rule = name.split("_")[0]
    overrides = [f"method={rule}", "method.gradient_clip_val=null"]
    if rule != "adamw":
        overrides.append(f"+method.optimizer.compile={str(not name.endswith('_eager')).lower()}")
    method = methods.build(model, overrides)
    if name == "adalomo_offload":
        from lomo_lightning.activations import ActivationOffloading

        def offloaded(batch: Any) -> None:
            with ActivationOffloading():
                loss = methods.loss_of(model, batch)
            method.engine.backward(loss)

        method.step = offloaded
    return method


def measure(name: str, method_name: str, device: torch.device, batch_size: int, seq: int, warmup: int, timed: int) -> dict[str, Any]:
    accelerator = torch.accelerator
    accelerator.empty_cache()
    model = build(name, device)
    method = method_of(method_name, model)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (batch_size, seq), device=device, generator=generator)
    warmup_s = []
    for _ in range(warmup):
        began = time.perf_counter()
        method.step(batch)
        accelerator.synchronize()
        warmup_s.append(time.perf_counter() - began)
    accelerator.reset_peak_memory_stats()
    times = []
    for _ in range(timed):
        start, end = torch.Event(device=device, enable_timing=True), torch.Event(device=device, enable_timing=True)
        start.record()
        method.step(batch)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return {"model": name, "method": method_name, "peak_gib": accelerator.max_memory_allocated() / 2**30,
            "step_s": statistics.median(times), "params": sum(p.numel() for p in model.parameters()),
            "warmup_s": warmup_s[0] if warmup_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama_1b"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    args = parser.parse_args()
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if device is None:
        raise SystemExit("gpu_check.py needs an accelerator (a CUDA GPU)")
    env.quiet(threads=torch.get_num_threads())
    rows = []
    for name in args.models:
        for method in args.methods:
            rows.append(measure(name, method, device, args.batch, args.seq, args.warmup, args.timed))
            print(rows[-1], flush=True)
    described = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    lines = [f"# bf16 on {described}: batch {args.batch} x {args.seq}, activation checkpointing", "",
             "| model | method | peak GiB | / floor | step s | / floor | first warm-up step s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        floor = next((r for r in rows if r["model"] == row["model"] and r["method"] == "floor"), row)
        lines.append(f"| {row['model']} ({row['params'] / 1e6:.0f}M) | {row['method']} | {row['peak_gib']:.2f} | "
                     f"{row['peak_gib'] / floor['peak_gib']:.3f} | {row['step_s']:.3f} | {row['step_s'] / floor['step_s']:.2f} | "
                     f"{row['warmup_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    env.write("gpu_check", {"environment": env.environment(device=described), "args": vars(args), "rows": rows}, text)
    print(text)


if __name__ == "__main__":
    main()
