"""The code's shape, as DESIGN.md asks for it: imports point one way, long modules say why.

Imports made when a module is imported must never form a cycle: a module lower down
(http, objects, containers) cannot import one above it (app, node, cli) at import time.
An import inside a function, made on first use, is how an upward call is written where
one is needed (``compat.clone`` finding the types it copies, say); those are not counted,
and neither are imports under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

# Read from the sources, not imported: an import cycle may break importing dockyard.
ROOT = Path(__file__).resolve().parents[1] / "src" / "dockyard"
LONG = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("dockyard", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _import_time_statements(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports run when the module is: the top level and its try/with blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found.extend(_import_time_statements(block))
        elif isinstance(node, ast.With):
            found.extend(_import_time_statements(node.body))
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            found.extend(_import_time_statements(node.body))
            found.extend(_import_time_statements(node.orelse))
    return found


def _imports(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """For each module, the Dockyard modules it imports at import time, with the line."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in _import_time_statements(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                found = resolve(target) if target.startswith("dockyard") else None
                if found is not None and found != name:
                    edges.setdefault(found, node.lineno)
        graph[name] = edges
    return graph


def _a_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(name: str) -> list[str] | None:
        path.append(name)
        on_path.add(name)
        for target in graph.get(name, {}):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done and (cycle := visit(target)) is not None:
                return cycle
        on_path.discard(path.pop())
        done.add(name)
        return None

    for name in graph:
        if name not in done and (cycle := visit(name)) is not None:
            return cycle
    return None


def test_modules_import_each_other_without_a_cycle() -> None:
    modules = _modules()
    graph = _imports(modules)
    cycle = _a_cycle(graph)
    if cycle is not None:
        steps = [
            f"{modules[a].relative_to(ROOT.parent)}:{graph[a][b]} imports {b}"
            for a, b in itertools.pairwise(cycle)
        ]
        raise AssertionError("import cycle:\n  " + "\n  ".join(steps))


def test_the_cycle_check_finds_a_cycle() -> None:
    # The check itself, on a graph with a cycle two steps down.
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"b": 3}, "d": {}}
    assert _a_cycle(graph) == ["b", "c", "b"]
    assert _a_cycle({"a": {"b": 1}, "b": {}}) is None


def test_the_import_graph_sees_relative_and_absolute_imports() -> None:
    graph = _imports(_modules())
    # Spot checks of edges known to exist, one of each spelling.
    assert "dockyard.errors" in graph["dockyard.http"]  # from .errors import ...
    assert "dockyard.config" in graph["dockyard.containers.manager"]  # from ..config
    assert "dockyard.containers.labels" in graph["dockyard.observe.usage"]  # absolute


def test_a_module_over_400_lines_says_why_at_its_top() -> None:
    unexplained = []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > LONG:
            docstring = " ".join((ast.get_docstring(ast.parse(text)) or "").split())
            if f"{LONG} lines" not in docstring:
                unexplained.append(f"{name} ({text.count(chr(10))} lines)")
    assert not unexplained, (
        f"modules over {LONG} lines whose docstring does not say why "
        f"(a sentence with '{LONG} lines'): {', '.join(unexplained)}"
    )
