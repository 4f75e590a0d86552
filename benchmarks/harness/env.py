"""Where results go, the environment every results file records, quiet workers, and the JSON/Markdown writer."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent
# LOMO_BENCH_RESULTS: write somewhere else (a quick check must not overwrite the committed results)
RESULTS = Path(os.environ.get("LOMO_BENCH_RESULTS", BENCHMARKS / "results"))
RUNS = BENCHMARKS / "runs"  # git-ignored: cached checkpoints and runs


def environment(**extra: Any) -> dict[str, Any]:
    """torch, Python, the machine, the library's commit and path, the date; ``extra`` added."""
    import torch

    import lomo_lightning

    # LOMO_BENCH_LIBRARY_COMMIT: the commit of a library snapshot put first on PYTHONPATH (benchmarks/README.md)
    commit = os.environ.get("LOMO_BENCH_LIBRARY_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=BENCHMARKS, capture_output=True, text=True
    ).stdout.strip()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": commit,
        "lomo_lightning_path": str(Path(lomo_lightning.__file__).parent),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **extra,
    }


def quiet(threads: int = 1) -> None:
    """No warnings, no progress bars, ``threads`` torch threads: a worker's output is its result."""
    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    torch.set_num_threads(threads)


def write(name: str, payload: dict[str, Any], markdown: str, title: str | None = None) -> Path:
    """``results/<name>.json`` (with the environment) and ``results/<name>.md`` (``title`` as its heading)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "environment": payload.get("environment") or environment()}, indent=2))
    (RESULTS / f"{name}.md").write_text((f"# {title}\n\n" if title else "") + markdown)
    return path


def figure(*args: Any, **kwargs: Any) -> Any:
    """``plt.subplots(*args, **kwargs)`` on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig: Any, name: str) -> None:
    """``fig`` laid out tight, as ``results/<name>.png``, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(fig)


def mib(x: float) -> float:
    return x / 2**20


def gib(x: float) -> float:
    return x / 2**30
