"""The import graph of app/, agents/, models/ and services/: imports run one way.

Every import counts, also those under TYPE_CHECKING and inside functions: a cycle hidden that
way is still a cycle for the reader. Issue 32 removes the cycles listed in KNOWN; a new cycle,
or a known one that grew, fails here, and a known one that is gone must be taken off the list.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "agents", "models", "services")

#: The cycles left to untie (issue 32), each a set of modules or of packages.
KNOWN_MODULE_CYCLES = [
    {"app.capture.access", "app.capture.base", "app.capture.database", "app.capture.entities",
     "app.capture.ownership"},
]
KNOWN_PACKAGE_CYCLES = [
    {"app.aggregations", "app.capture", "app.inbox", "app.orm", "app.outbox", "app.topology", "app.wire"},
]


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def import_edges(found: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (an imported name resolves to its module)."""
    def resolve(name: str) -> str | None:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: Iterable[str] = ()
            if isinstance(node, ast.Import):
                targets = (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = (f"{node.module}.{alias.name}" for alias in node.names)
            for target in targets:
                module = resolve(target)
                if module is not None and module != name:
                    edges[name].add(module)
    return edges


def package_of(module: str) -> str:
    """A package of app/ (app.capture, ...), a top-level module of app/ on its own, or the top package."""
    parts = module.split(".")
    if parts[0] == "app" and len(parts) > 1 and (ROOT / "app" / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module if parts[0] == "app" else parts[0]


def cycles(nodes: Iterable[str], edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return out


def test_no_module_imports_in_a_cycle_other_than_the_known_ones() -> None:
    found = modules()
    assert sorted(map(sorted, cycles(found, import_edges(found)))) == sorted(map(sorted, KNOWN_MODULE_CYCLES))


def test_no_packages_import_each_other_other_than_the_known_ones() -> None:
    found = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for source, targets in import_edges(found).items():
        for target in targets:
            if package_of(source) != package_of(target):
                edges[package_of(source)].add(package_of(target))
    got = cycles({package_of(m) for m in found}, edges)
    assert sorted(map(sorted, got)) == sorted(map(sorted, KNOWN_PACKAGE_CYCLES))
