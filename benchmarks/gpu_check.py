"""bf16 memory and speed on one CUDA GPU: the floor, AdamW and fused AdaLomo / LOMO, eager and compiled (and AdaLomo
with activation offloading), on SmolLM2-135M and a 1.1B Llama.

    python benchmarks/gpu_check.py            # ~3 minutes on one H100/H200 (benchmarks/gpu_check.sh runs it)

Per model and method, in this process one after another: ``torch.cuda.max_memory_allocated`` over a step
(after warm-up steps, so optimizer state exists) and the median step time by CUDA events. bf16 weights
(``bf16-true``: AdaLomo/LOMO write back with stochastic rounding, the default), batch 4 x 512 random
tokens, activation checkpointing. The **floor** is forward and backward with every gradient dropped the
moment it is ready and no update. Results: ``benchmarks/results/gpu_check.{json,md}``.

``adalomo``/``lomo`` run the rules' compiled kernels (``compile=True``: Triton); ``adalomo_eager``/``lomo_eager``
the eager reference (``compile=False``). A compiled method's warm-up steps pay its compilation, reported
as ``warmup_s`` (the first warm-up step's time).

Targets (the README's): fused AdaLomo's peak within 1.05x of the floor and step time within 1.10x of it.
``adalomo_offload`` is fused AdaLomo with :class:`~lomo_lightning.activations.ActivationOffloading` around the
forward (what ``activation_offloading="auto"`` does on a GPU with checkpointing): the real cost of the copies to
and from pinned host memory, and the device memory they free, which fake tensors (``memory_scale.py``) cannot time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["floor", "adamw", "adalomo", "adalomo_eager", "lomo", "lomo_eager", "adalomo_offload"]


def build(name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2":
        from lomo_lightning.models import smollm2_directory

        model = AutoModelForCausalLM.from_pretrained(smollm2_directory(), dtype=torch.bfloat16)
    else:  # TinyLlama-1.1B's shape, random weights
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, use_cache=False)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.cuda().train()


def step_function(method: str, model: torch.nn.Module):
    from lomo_lightning import AdaLomo, FusedUpdater, Lomo

    params = [p for p in model.parameters() if p.requires_grad]
    if method == "floor":
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        return lambda batch: model(**batch).loss.backward()
    if method == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def adamw_step(batch):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return adamw_step
    compile = not method.endswith("_eager")
    rule = AdaLomo(params, lr=1e-3, compile=compile) if method.startswith("adalomo") else Lomo(params, lr=1e-3, compile=compile)
    updater = FusedUpdater(model, rule)
    if method == "adalomo_offload":
        from lomo_lightning.activations import ActivationOffloading

        def offloaded_step(batch):
            with ActivationOffloading():
                loss = model(**batch).loss
            updater.backward(loss)

        return offloaded_step
    return lambda batch: updater.backward(model(**batch).loss)


def measure(name: str, method: str, batch_size: int, seq: int, warmup: int, timed: int) -> dict[str, Any]:
    torch.cuda.empty_cache()
    model = build(name)
    step = step_function(method, model)
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq), device="cuda", generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    import time

    warmup_s = []
    for _ in range(warmup):
        began = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        warmup_s.append(time.perf_counter() - began)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(timed):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(batch)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    result = {"model": name, "method": method, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "step_s": statistics.median(times), "params": sum(p.numel() for p in model.parameters()),
              "warmup_s": warmup_s[0] if warmup_s else None}
    del model, step
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama_1b"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    rows = []
    for name in args.models:
        for method in args.methods:
            row = measure(name, method, args.batch, args.seq, args.warmup, args.timed)
            print(row, flush=True)
            rows.append(row)
    lines = [f"# bf16 on {torch.cuda.get_device_name()}: batch {args.batch} x {args.seq}, activation checkpointing", "",
             "| model | method | peak GiB | / floor | step s | / floor | first warm-up step s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        floor = next((r for r in rows if r["model"] == row["model"] and r["method"] == "floor"), row)
        lines.append(f"| {row['model']} ({row['params'] / 1e6:.0f}M) | {row['method']} | {row['peak_gib']:.2f} | "
                     f"{row['peak_gib'] / floor['peak_gib']:.3f} | {row['step_s']:.3f} | {row['step_s'] / floor['step_s']:.2f} | "
                     f"{row['warmup_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_check.md").write_text(text)
    (RESULTS / "gpu_check.json").write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                                                        "args": vars(args), "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
