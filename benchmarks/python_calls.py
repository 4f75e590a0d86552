"""Calls of lomo_lightning's own Python functions per trainable parameter per fused AdaLomo step.

On a GPU a kernel takes microseconds, so the Python the engine runs around each parameter's update is the
step time of a small model and a visible share of a large one. This counts it: ``sys.setprofile`` sees
every Python function call (a generator resumed counts as a call) during one fused step,
``FusedUpdater.backward`` on a small Llama, after a warm-up step that created the state; the calls whose
code lives in the package are divided by the number of trainable parameters. Two settings: bf16
parameters written back with stochastic rounding, and fp32 parameters::

    python benchmarks/python_calls.py            # prints one line per setting
    python benchmarks/python_calls.py --by-function   # and which functions were called, how often

(The autograd engine runs CPU backward on the calling thread, so a per-thread profiler sees every hook.)
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lomo_lightning
from lomo_lightning import AdaLomo, FusedUpdater
from lomo_lightning.optim.kernels import compiler_works

PACKAGE = str(Path(lomo_lightning.__file__).resolve().parent)


def small_llama(dtype: torch.dtype, layers: int = 2) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")


def count_calls(dtype: torch.dtype, clip_grad_norm: float | None, compile: bool) -> tuple[float, collections.Counter[str]]:
    """Package Python calls per trainable parameter during one fused step, and the count by function."""
    model = small_llama(dtype)
    optimizer = AdaLomo(model.parameters(), lr=1e-3, rounding="stochastic", compile=compile)
    updater = FusedUpdater(model, optimizer, clip_grad_norm=clip_grad_norm, compile=compile)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids}
    updater.backward(model(**batch).loss)  # warm-up: state created, caches filled
    loss = model(**batch).loss
    calls: collections.Counter[str] = collections.Counter()

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            code = frame.f_code
            calls[f"{Path(code.co_filename).relative_to(PACKAGE)}:{code.co_name}"] += 1

    sys.setprofile(profile)
    try:
        updater.backward(loss)
    finally:
        sys.setprofile(None)
    return sum(calls.values()) / len(updater.parameters), calls


def time_steps(dtype: torch.dtype, compile: bool, layers: int, steps: int) -> tuple[float, float]:
    """Median seconds of one fused AdaLomo step (forward, backward and update) on a Llama of ``layers`` small
    layers, and of the floor (forward and backward, each gradient dropped as it is made), interleaved.

    Seconds of this process's CPU time on one torch thread: on a shared, loaded machine wall time measures
    the neighbours as much as the step."""
    torch.set_num_threads(1)
    fused_model, floor_model = small_llama(dtype, layers), small_llama(dtype, layers)
    updater = FusedUpdater(fused_model, AdaLomo(fused_model.parameters(), lr=1e-3, compile=compile), compile=compile)
    for param in floor_model.parameters():
        param.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids}
    fused_s, floor_s = [], []
    for step in range(steps + 3):  # 3 warm-up steps
        began = time.process_time()
        updater.backward(fused_model(**batch).loss)
        middle = time.process_time()
        floor_model(**batch).loss.backward()
        if step >= 3:
            fused_s.append(middle - began)
            floor_s.append(time.process_time() - middle)
    return statistics.median(fused_s), statistics.median(floor_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="also measure the norm pass (two backward passes)")
    parser.add_argument("--by-function", action="store_true", help="print the calls by function")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled rows (compiling takes a while)")
    parser.add_argument("--time", action="store_true", help="also time fused steps (eager, CPU time) against the floor")
    parser.add_argument("--layers", type=int, default=16, help="--time: layers of the timed Llama (9 parameters each)")
    parser.add_argument("--steps", type=int, default=30, help="--time: timed steps")
    args = parser.parse_args()
    settings = [False] if args.eager_only else [False, True]
    if True in settings and not compiler_works("cpu"):
        print("compiled: torch.compile does not work here; eager rows only")
        settings = [False]
    for compile in settings:
        for name, dtype in (("bf16, stochastic rounding", torch.bfloat16), ("fp32", torch.float32)):
            per_parameter, calls = count_calls(dtype, args.clip_grad_norm, compile)
            mode = "compiled" if compile else "eager"
            print(f"{name}, {mode}: {per_parameter:.1f} package Python calls per parameter per fused AdaLomo step")
            if args.by_function:
                for function, count in calls.most_common():
                    print(f"    {count:6d}  {function}")
    if args.time:
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            fused_s, floor_s = time_steps(dtype, compile=False, layers=args.layers, steps=args.steps)
            print(
                f"{name}, eager, {args.layers} layers: fused AdaLomo step {fused_s * 1e3:.1f} ms, floor {floor_s * 1e3:.1f} ms, "
                f"the update {(fused_s - floor_s) * 1e3:.1f} ms (CPU time, median of {args.steps} steps)"
            )


if __name__ == "__main__":
    main()
