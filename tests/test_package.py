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
    assert registered == "['lomo', 'lomo_ddp', 'lomo_fsdp', 'lomo_fsdp_unfused']"


def test_every_package_is_listed_for_the_build_and_the_configs_install_with_it():
    """conf/ sits beside lomo_lightning/ and installs as lomo_lightning.conf (setuptools package-dir)."""
    import importlib.resources
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "lomo_lightning").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"lomo_lightning.conf"}, "a package folder missing from pyproject.toml"
    assert setuptools["package-dir"]["lomo_lightning.conf"] == "conf" and (root / "conf" / "config.yaml").is_file()
    installed = importlib.resources.files("lomo_lightning.conf")
    groups = {entry.name for entry in installed.iterdir() if entry.is_dir() and entry.name != "__pycache__"}
    assert groups == {p.name for p in (root / "conf").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert (installed / "config.yaml").read_text() == (root / "conf" / "config.yaml").read_text()
