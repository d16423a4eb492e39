"""The package's import structure: layers import downwards only, and no module imports itself in a circle.

Layers, lowest first (``docs/design.md``)::

    0  errors registry seeding config         (and the package root: __version__ only)
       safeio schema runlock                  the guarded reader + the one atomic write, JSON schemas, the lock
    1  core                                    pure functions
    2  data model                              inputs and the network
    3  methods                                 hooks, classifiers
    4  fed                                     build, loop, clients, records, run directory
    5  flower api                              engines and the library entry point
    6  app __main__                            command line, sweeps, reports, export

Every ``import`` and ``from ... import`` of a module counts, at any depth (lazy imports inside functions
too); imports under ``if TYPE_CHECKING:`` count for the layering but not for circles (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedtalora"

LAYERS = {
    "fedtalora": 0, "errors": 0, "registry": 0, "seeding": 0, "config": 0,
    "safeio": 0, "schema": 0, "runlock": 0,
    "core": 1, "aggregation": 1,  # ``fedtalora.aggregation``: the alias of core.aggregation
    "data": 2, "model": 2,
    "methods": 3,
    "fed": 4,
    "flower": 5, "api": 5,
    "app": 6, "__main__": 6,
}


def module_name(path: Path, root: Path = SRC) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["fedtalora"]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, modules: set[str], root: Path = SRC) -> list[tuple[str, int, bool]]:
    """``(imported fedtalora module, line, only under TYPE_CHECKING)`` of every import in ``path``."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.body:
                    visit_stmt(sub, True)
                for sub in child.orelse:
                    visit_stmt(sub, typing_only)
                continue
            visit_stmt(child, typing_only)

    def visit_stmt(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fedtalora":
                    out.append((_known(alias.name), node.lineno, typing_only))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fedtalora":
                return
            for alias in node.names:  # ``from . import x`` may import the submodule x
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in modules else _known(target), node.lineno, typing_only))
        visit(node, typing_only)

    def _known(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return out


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := dfs(v)) is not None:
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(edges):
        if u not in state and (found := dfs(u)) is not None:
            return found
    return None


def test_every_module_has_a_layer() -> None:
    for module in graph():
        assert isinstance(layer(module), int), module


def test_no_import_goes_up_a_layer() -> None:
    bad = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)}) at line {line}"
           for m, targets in graph().items() for t, line, _ in targets if layer(t) > layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_circles() -> None:
    edges = {m: {t for t, _, typing_only in targets if not typing_only and t != m} for m, targets in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


# --- the checker itself can fail -----------------------------------------------------------------------


def test_the_cycle_finder_finds_a_circle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(("source", "expected"), [
    ("from ..app.cli import main\n", ("fedtalora.app.cli", False)),
    ("from .. import api\n", ("fedtalora.api", False)),
    ("def f():\n    from ..flower import grid\n", ("fedtalora.flower.grid", False)),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..fed.loop import RunResult\n",
     ("fedtalora.fed.loop", True)),
])
def test_the_import_reader_resolves_relative_lazy_and_typing_imports(tmp_path, source, expected) -> None:
    root = tmp_path / "fedtalora"  # the probe reads as fedtalora.core.probe (a core module)
    (root / "core").mkdir(parents=True)
    probe = root / "core" / "probe.py"
    probe.write_text(source)
    found = imports(probe, set(graph()), root)
    assert expected in [(t, typing) for t, _, typing in found]
    assert layer(expected[0]) > layer("fedtalora.core.probe")  # so the layering test would report it
