"""MemTracker's peak by category, one method per fresh process, step timing, the tables' and plots' shared parts."""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .env import RESULTS, figure, mib, save

CATEGORIES = ["parameters", "gradients", "optimizer_state", "activations", "temporaries", "other"]


class _NoHandle:
    def remove(self) -> None:
        pass


def skip_frozen_parameters(tracker: Any, model: Any) -> None:
    """MemTracker would register a gradient hook on every parameter, which a frozen one refuses."""
    for param in model.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHandle(), _NoHandle())


def track_sparse_compressed_tensors() -> None:
    """Let MemTracker count a sparse CSR tensor (SFT's sampled gradient) by its parts: it has no storage of its own."""
    import torch
    from torch.distributed._tools import common_utils, mem_tracker

    def storages(tensor: Any) -> Any:
        if getattr(tensor, "layout", None) == torch.sparse_csr:
            parts = (tensor.crow_indices(), tensor.col_indices(), tensor.values())
            return set().union(*(common_utils.get_untyped_storages(part) for part in parts))
        return common_utils.get_untyped_storages(tensor)

    mem_tracker.get_untyped_storages = storages


def categories(snapshot: dict) -> dict[str, int]:
    """A MemTracker snapshot (``_MemRefType`` -> bytes) in the categories every benchmark reports (they sum to the total)."""
    from torch.distributed._tools.mem_tracker import _MemRefType as T

    get = snapshot.get
    return {"parameters": get(T.PARAM, 0), "gradients": get(T.GRAD, 0), "optimizer_state": get(T.OPT, 0),
            "activations": get(T.ACT, 0), "temporaries": get(T.TEMP, 0), "other": get(T.OTH, 0) + get(T.BUFFER, 0)}


def peak_by_category(tracker: Any) -> dict[str, int]:
    """A MemTracker's peak, in bytes by category."""
    peak = tracker.get_tracker_snapshot("peak")
    return categories(next(iter(peak.values())) if peak else {})


def measure(model: Any, step: Callable[[Any], Any], batch: Any, optimizers: Iterable[Any] = (),
            state: Callable[[], list] = list, *, warmup: int, timed: int) -> dict[str, Any]:
    """Step time and peak memory of ``step(batch)``, which trains ``model`` one step.

    ``warmup`` steps (so that optimizer state exists), ``timed`` steps (wall clock each), then one step under
    MemTracker. It watches ``optimizers`` and counts ``state()`` (tensors it cannot find itself) as optimizer state.
    """
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    track_sparse_compressed_tensors()
    tracker = MemTracker()
    skip_frozen_parameters(tracker, model)
    tracker.track_external(model, *([batch] if hasattr(batch, "untyped_storage") else []), *optimizers)
    for tensor in state():
        tracker._update_and_maybe_create_winfos(tensor, _MemRefType.OPT)
    with tracker:
        step(batch)
    by_category = peak_by_category(tracker)
    result = {"peak_bytes": sum(by_category.values()), "peak_by_category_bytes": by_category,
              "peak_rss_mib": peak_rss, "step_times_s": times, "tracked_steps": 1}
    if times:
        tokens = batch.numel() if hasattr(batch, "numel") else batch["input_ids"].numel()
        result.update(step_time_s=statistics.median(times), tokens_per_s=tokens / statistics.median(times))
    return result


def failure(error: BaseException) -> str:
    """The exception's first line and the line of code outside torch that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    origin = next((f for f in reversed(frames) if f"{os.sep}torch{os.sep}" not in f.filename), frames[-1])
    message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
    return f"{message} (at {Path(origin.filename).parent.name}/{Path(origin.filename).name}:{origin.lineno}: `{origin.line}`)"


def worker_main(worker: Callable[[str, dict], dict]) -> bool:
    """In a worker process (``--worker M --spec JSON --out FILE``): run ``worker(M, spec)``, write its result
    (or why it failed) and return True; in the driver, return False. The rules run eagerly (``compiled_kernels.py``
    times compiled ones)."""
    if "--worker" not in sys.argv:
        return False
    os.environ.setdefault("LOMO_LIGHTNING_COMPILE", "0")  # eager rules: MemTracker cannot see into compiled kernels
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    method = args["--worker"]
    try:
        result = worker(method, json.loads(args["--spec"]))
    except Exception as error:  # a method that cannot run here: its reason is the result
        traceback.print_exc()
        result = {"method": method, "error": failure(error)}
    Path(args["--out"]).write_text(json.dumps(result))
    return True


def in_subprocess(script: str, method: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``script --worker method`` in a fresh process: its result, or its last error line."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        command = [sys.executable, script, "--worker", method, "--spec", json.dumps(spec), "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if not out.exists():
            print(done.stderr[-4000:], file=sys.stderr)
            return {"method": method, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        return dict(json.loads(out.read_text()), wall_s=time.perf_counter() - start)


def run_methods(script: str, methods: list[str], spec: dict[str, Any], order: list[str], name: str,
                write: Callable[[list[dict]], str], jobs: int = 1, env: Callable[[str], dict | None] = lambda m: None) -> None:
    """Every method in a fresh process (``jobs`` at a time), rows in ``order``, merged into ``results/<name>.json``'s
    rows when only some are run; ``write(rows)`` writes the results after each method (an interrupted run keeps them)."""
    path = RESULTS / f"{name}.json"
    previous = json.loads(path.read_text())["results"] if path.exists() and set(methods) != set(order) else []
    rows = {r["method"]: r for r in previous}
    table = ""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for row in pool.map(lambda m: in_subprocess(script, m, spec, env(m)), methods):
            rows[row["method"]] = row
            said = row.get("error") or f"peak {mib(row['peak_bytes']):.1f} MiB, step {row.get('step_time_s', math.nan):.3f} s"
            print(f"[{name}] {row['method']}: {said}", flush=True)
            table = write([rows[m] for m in order if m in rows])
    print(table)


def check(checks: list, name: str, value: float | None, bound: float, strict: bool = False) -> None:
    """Append a target's verdict to ``checks``: ``value <= bound`` (``<`` if ``strict``); None when unmeasured."""
    verdict = None if value is None else bool(value < bound if strict else value <= bound)
    checks.append({"target": name, "value": None if value is None else round(value, 4), "bound": bound,
                   "relation": "<" if strict else "<=", "pass": verdict})


def targets_table(checks: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | bound | result |", "|---|---|---|---|"]
    for c in checks:
        verdict = "n/a" if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        bound = f"{c['relation']} {c['bound']}" if "relation" in c else c["bound"]
        lines.append(f"| {c['target']} | {value} | {bound} | {verdict} |")
    return lines


def plot(name: str, rows: list[dict[str, Any]], labels: dict[str, str]) -> None:
    """``results/<name>_memory.png`` (peak by category) and ``<name>_time.png`` (median step, min-max)."""
    rows = [r for r in rows if "error" not in r]
    fig, ax = figure(figsize=(10, 0.5 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for category in CATEGORIES:
        values = [mib(r["peak_by_category_bytes"][category]) for r in rows]
        ax.barh([labels[r["method"]] for r in rows], values, left=left, label=category.replace("_", " "))
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set(xlabel="MemTracker peak (MiB)", title=f"Peak memory by category ({name})")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, f"{name}_memory")
    timed = [r for r in rows if "step_time_s" in r]
    fig, ax = figure(figsize=(10, 0.5 * len(timed) + 1.5))
    ax.barh([labels[r["method"]] for r in timed], [r["step_time_s"] for r in timed], color="tab:orange")
    for i, r in enumerate(timed):
        ax.plot([min(r["step_times_s"]), max(r["step_times_s"])], [i, i], color="black", lw=1)
    ax.invert_yaxis()
    ax.set(xlabel="step time, s (bar: median; line: min-max of timed steps)", title=f"Step time ({name})")
    save(fig, f"{name}_time")
