"""The data flows one way: no import cycles inside ``harness``; fitting code never
imports report code.

Every import counts, also one inside a function (a lazy import is still a
dependency), except those under ``if TYPE_CHECKING:``, which never run.  The
top-level ``harness/__init__.py`` is left out: a submodule that imports its
parent package is how Python packages work, not a cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "harness"

#: Subpackages/modules that fit, check or orchestrate: they must not import report code.
FITTING = (
    "harness.model",
    "harness.engines",
    "harness.checks",
    "harness.pipeline",
    "harness.audit",
)
REPORT = "harness.report"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    edges = set()
    for target in found:
        # "harness.x.y.func" imports module harness.x.y: take the longest known prefix.
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        module = ".".join(parts)
        if module and module != "harness" and module != name:
            edges.add(module)
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: _imports(path, name, known) for name, path in modules.items() if name != "harness"
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return components


def test_the_graph_sees_lazy_imports() -> None:
    """The checker itself: a function-level import is an edge."""
    graph = _graph()
    assert graph, "no modules found"
    assert any(edges for edges in graph.values())


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_fitting_code_never_imports_report_code() -> None:
    offenders = {
        module: sorted(t for t in targets if t == REPORT or t.startswith(REPORT + "."))
        for module, targets in _graph().items()
        if any(module == name or module.startswith(name + ".") for name in FITTING)
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def _package(module: str) -> str:
    """The subpackage (or top-level module) of ``harness`` a module belongs to."""
    return ".".join(module.split(".")[:2])


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(_package(module), set())
        edges.update(_package(t) for t in targets if _package(t) != _package(module))
    return packages


def test_the_package_graph_finds_a_cycle() -> None:
    """The checker itself: two packages importing each other are one cycle."""
    graph = {
        "harness.a.x": {"harness.b.y"},
        "harness.b.y": {"harness.b.z"},
        "harness.b.z": {"harness.a.w"},
        "harness.a.w": set(),
    }
    assert _cycles(_package_graph(graph)) == [["harness.a", "harness.b"]]


def test_no_import_cycles_between_packages() -> None:
    """No subpackage imports one that imports it back (engines never import checks)."""
    assert _cycles(_package_graph(_graph())) == []
