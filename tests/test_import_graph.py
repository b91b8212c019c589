"""The import graph of app/, agents/, models/ and services/: imports run one way.

Every import counts, also those under TYPE_CHECKING and inside functions: a cycle hidden that
way is still a cycle for the reader. Packages are app/'s folders, each top-level module of
app/ on its own, and agents, models, services.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "agents", "models", "services")

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


def test_no_module_imports_itself_back_through_others() -> None:
    found = modules()
    assert [sorted(c) for c in cycles(found, import_edges(found))] == []


def test_no_two_packages_import_each_other_even_through_others() -> None:
    found = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for source, targets in import_edges(found).items():
        for target in targets:
            if package_of(source) != package_of(target):
                edges[package_of(source)].add(package_of(target))
    assert [sorted(c) for c in cycles({package_of(m) for m in found}, edges)] == []


def test_the_library_never_imports_the_demo() -> None:
    # STYLE habit 11: app/ and agents/ serve every company service; the demo's models and
    # services are one of them, loaded by name (MODELS) or started on their own (`python -m services`).
    found = modules()
    library = ("app", "agents")
    demo = ("models", "services")
    reaching = sorted(f"{source} -> {target}" for source, targets in import_edges(found).items()
                      for target in targets
                      if source.split(".")[0] in library and target.split(".")[0] in demo)
    assert reaching == []
