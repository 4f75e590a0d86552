"""Register this package's strategy names with Lightning whenever Lightning is imported, before or after this package.

``Trainer(strategy="lomo")`` looks the name up in Lightning's ``StrategyRegistry``, which only
:mod:`lomo_lightning.strategies` fills; importing that module loads Lightning, which ``import lomo_lightning``
must not do (the rules and the engine need torch alone). So: if Lightning is already loaded, the strategies
are registered at once; otherwise a one-shot post-import hook (a ``sys.meta_path`` finder, as ``wrapt``'s
``register_post_import_hook`` does it) waits for ``lightning.pytorch`` to finish loading and registers them
then. The finder changes nothing else about the import: it finds the module with the other finders, and the
module keeps its own loader.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

LIGHTNING = "lightning.pytorch"
STRATEGIES = "lomo_lightning.strategies"


def register_strategies_with_lightning() -> None:
    """Make ``Trainer(strategy="lomo" | "lomo_ddp" | "lomo_fsdp" | ...)`` work now, or as soon as Lightning loads."""
    if LIGHTNING in sys.modules:
        importlib.import_module(STRATEGIES)
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(LIGHTNING, _import_strategies))


def _import_strategies(_: ModuleType) -> None:
    try:
        importlib.import_module(STRATEGIES)
    except Exception as error:  # noqa: BLE001  # never break the user's `import lightning`
        warnings.warn(
            f"lomo_lightning could not register its strategies with Lightning ({type(error).__name__}: {error}): "
            f"import {STRATEGIES} to see why",
            RuntimeWarning,
            stacklevel=2,
        )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hook(module)`` once, right after the module ``name`` has been executed."""

    def __init__(self, name: str, hook: Callable[[ModuleType], None]):
        self.name = name
        self.hook = hook

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding this finder again
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, self.hook)
        return spec


class _HookedLoader(importlib.abc.Loader):
    """The module's own loader, then the hook; the module is left with its own loader."""

    def __init__(self, loader: Any, hook: Callable[[ModuleType], None]):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.hook(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...: the module's own loader's
        return getattr(self.loader, name)
