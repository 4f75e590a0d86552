"""The package's surface: light to import for the rules and the engine, every public name reachable, strategies registered."""

from __future__ import annotations

import subprocess
import sys

import lomo_lightning


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_rules_and_the_engine_import_without_lightning_or_transformers():
    loaded = python(
        "import sys\n"
        "from lomo_lightning import AdaLomo, FusedUpdater, Lomo, HalfFineTuning, SparseFineTuning\n"
        "print(sorted(m for m in ('lightning', 'lightning.pytorch', 'transformers', 'datasets') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_every_public_name_resolves():
    assert set(lomo_lightning.__all__) == {"__version__", *lomo_lightning._EXPORTS}
    for name in lomo_lightning.__all__:
        assert getattr(lomo_lightning, name) is not None, name
    assert lomo_lightning.__version__.count(".") >= 2


def test_importing_after_lightning_registers_the_strategies_by_name():
    registered = python(
        "import lightning.pytorch as pl\n"
        "import lomo_lightning\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "print(sorted(n for n in StrategyRegistry if n.startswith('lomo')))"
    )
    assert registered == "['lomo', 'lomo_ddp', 'lomo_fsdp']"
