"""No import circles inside replearn: every module's imports of its siblings, at module level and inside
functions alike (a lazy import hides a circle, it does not break it), form a graph without cycles."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "replearn"


def imported_siblings(path: Path, modules: set[str]) -> set[str]:
    """The replearn modules one file imports, wherever in the file the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "replearn":       # from . import x / from .x import y
                parts = (node.module or "").split(".") if node.level == 1 else []
                found |= {parts[0]} if parts and parts[0] else {alias.name for alias in node.names}
            elif node.level == 0 and (node.module or "").startswith("replearn."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("replearn.")}
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: imported_siblings(path, set(files)) for name, path in sorted(files.items())}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph has none (depth-first, three colours)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_parser_sees_lazy_and_absolute_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from . import a, b\nfrom .c import f\nimport replearn.d\nfrom replearn import e\n"
                      "def g():\n    from .f import h\n")
    assert imported_siblings(source, set("abcdefx")) == set("abcdef")


def test_replearn_has_no_import_cycles():
    graph = import_graph()
    assert {"pretrain", "runs", "evaluate", "nets", "zoo"} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
