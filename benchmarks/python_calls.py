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
import sys
from pathlib import Path
from typing import Any

import torch

import lomo_lightning
from lomo_lightning import AdaLomo, FusedUpdater

PACKAGE = str(Path(lomo_lightning.__file__).resolve().parent)


def small_llama(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")


def count_calls(dtype: torch.dtype, clip_grad_norm: float | None) -> tuple[float, collections.Counter[str]]:
    """Package Python calls per trainable parameter during one fused step, and the count by function."""
    model = small_llama(dtype)
    optimizer = AdaLomo(model.parameters(), lr=1e-3, rounding="stochastic")
    updater = FusedUpdater(model, optimizer, clip_grad_norm=clip_grad_norm)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="also measure the norm pass (two backward passes)")
    parser.add_argument("--by-function", action="store_true", help="print the calls by function")
    args = parser.parse_args()
    for name, dtype in (("bf16, stochastic rounding", torch.bfloat16), ("fp32", torch.float32)):
        per_parameter, calls = count_calls(dtype, args.clip_grad_norm)
        print(f"{name}: {per_parameter:.1f} package Python calls per parameter per fused AdaLomo step")
        if args.by_function:
            for function, count in calls.most_common():
                print(f"    {count:6d}  {function}")


if __name__ == "__main__":
    main()
