"""The fused step's own Python: at most 8 calls of the package's functions per parameter per AdaLomo step.

On a GPU a kernel takes microseconds, and the Python the engine runs around each parameter's update is
the step time of a small model (issue 20). What is fixed about a parameter is computed when the engine
attaches, so the hook only runs the update. Counted as ``benchmarks/python_calls.py`` counts it: a profiler
sees every call of a function whose code lives in the package (a generator resumed counts as a call) during
one fused step after a warm-up step. The count is deterministic; nothing is timed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import batches, tiny_llama

import lomo_lightning
from lomo_lightning import AdaLomo, FusedUpdater

PACKAGE = str(Path(lomo_lightning.__file__).resolve().parent)
BUDGET = 8  # package Python calls per trainable parameter per fused step


def calls_per_parameter(dtype: torch.dtype, compile: bool) -> float:
    model = tiny_llama(dtype=dtype)
    updater = FusedUpdater(model, AdaLomo(model.parameters(), lr=1e-3, rounding="stochastic", compile=compile), compile=compile)
    first, second = batches(2)
    updater.backward(model(**first).loss)  # the state is made at the first step
    loss = model(**second).loss
    calls = 0

    def profile(frame: Any, event: str, _arg: Any) -> None:
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            calls += 1

    sys.setprofile(profile)
    try:
        assert updater.backward(loss)
    finally:
        sys.setprofile(None)
    return calls / len(updater.parameters)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_fused_adalomo_step_runs_at_most_8_package_calls_per_parameter(dtype):
    assert calls_per_parameter(dtype, compile=False) <= BUDGET


@pytest.mark.compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_compiled_fused_adalomo_step_runs_at_most_8_package_calls_per_parameter(dtype):
    assert calls_per_parameter(dtype, compile=True) <= BUDGET
