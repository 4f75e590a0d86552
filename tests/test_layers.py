"""The package's modules import one way, down: no import cycle, counting every import in a module (inside
functions and under ``TYPE_CHECKING`` too) and the package ``__init__`` files that an import runs.

``lint-imports`` (``[tool.importlinter]`` in pyproject.toml) checks the named layers; this checks that no
module, named in a layer or not, is part of a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lomo_lightning

ROOT = Path(lomo_lightning.__file__).parent
PACKAGE = "lomo_lightning"

def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that importing ``name`` runs directly: every import statement anywhere in it,
    and the ``__init__`` of each package on the way to an imported module (the root's aside: it imports
    nothing of the package at import time, PEP 562)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    runs: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # the packages on the way, then the module itself
            step = ".".join(parts[:i])
            if step in modules and step not in own_packages:
                runs.add(step)
    return runs


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def package_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_cycle_finder_finds_a_deferred_cycle_through_a_package_init():
    graph = {"p.a": {"p.sub"}, "p.sub": {"p.sub.b"}, "p.sub.b": {"p.a"}, "p.c": set()}
    assert import_cycles(graph) == [{"p.a", "p.sub", "p.sub.b"}]


def test_the_graph_counts_deferred_imports_and_package_inits():
    graph = package_graph()
    # fused.py imports lomo_lightning.optim.base at the top: the optim package's __init__ runs too
    assert {"lomo_lightning.optim", "lomo_lightning.optim.base", "lomo_lightning.placement"} <= graph["lomo_lightning.fused"]
    # models.py imports its tokenizer inside a function
    assert "lomo_lightning.data.tokenizer" in graph["lomo_lightning.models"]


def test_no_import_cycle_among_the_package_modules():
    cycles = import_cycles(package_graph())
    assert not cycles, f"import cycles: {[sorted(cycle) for cycle in cycles]}"
