"""Imports flow one way through replearn's subpackages: core <- data, models <- train <- probe <- publish
<- studies <- the entry points (chain, budget, cli). Every module's imports, at module level and inside
functions alike (a lazy import hides a circle, it does not break it), form a graph without cycles, and no
module imports a subpackage above its own."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "replearn"
# a module may import its own layer or those before it; data and models share a floor
LAYERS = {"core": 0, "data": 1, "models": 1, "train": 2, "probe": 3, "publish": 4, "studies": 5, "": 6}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """probe/svm/solver.py -> 'probe.svm.solver'; data/__init__.py -> 'data'; cli.py -> 'cli'."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The replearn modules one file imports, wherever in the file the import statement is; `from x import y`
    counts as importing x.y when that is a module, else x."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "replearn":
                stem = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                sub = f"{stem}.{alias.name}" if stem else alias.name
                targets.append(sub if sub in modules else stem)
        elif isinstance(node, ast.Import):
            targets = [a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == "replearn"]
        found |= {t for t in targets if t in modules}
    return found - {name, ""}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imported_modules(path, set(files), root) for name, path in sorted(files.items())}


def layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS[top if top in LAYERS else ""]


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


def test_the_parser_sees_lazy_relative_and_absolute_imports(tmp_path):
    (tmp_path / "probe").mkdir()
    source = tmp_path / "probe" / "x.py"
    source.write_text("from . import a\nfrom ..core.c import f\nimport replearn.data\nfrom replearn.models import e\n"
                      "def g():\n    from ..train import h\n")
    modules = {"probe.a", "core.c", "data", "models.e", "train.h", "probe.x"}
    assert imported_modules(source, modules, tmp_path) == modules - {"probe.x"}


def test_replearn_has_no_import_cycles():
    graph = import_graph()
    assert {"train.pretrain", "train.runs", "train.evaluate", "models.nets", "models.zoo", "core.stage"} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_down_the_layers():
    upward = [f"{a} imports {b}" for a, deps in import_graph().items() for b in sorted(deps) if layer(b) > layer(a)]
    assert not upward, "imports against the flow core <- data, models <- train <- probe <- publish <- studies <- " \
                       "chain/cli: " + "; ".join(upward)


def private_imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """`from <module> import _name` where <module> lies in another subpackage than `path`."""
    package = module_name(path, root).split(".")[0] if "/" in str(path.relative_to(root)) else ""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level >= 2 or (isinstance(node, ast.ImportFrom)
                                                                    and (node.module or "").startswith("replearn.")):
            target = (node.module or "").removeprefix("replearn.")
            if target.split(".")[0] != package:
                found += [f"{target}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


SHARED_PRIVATE: set[str] = set()


def test_no_module_borrows_another_packages_private_helpers():
    borrowed = {f"{module_name(p)} imports {name}" for p in PACKAGE.rglob("*.py") for name in private_imports(p)
                if name not in SHARED_PRIVATE}
    assert not borrowed, "move the helper down and make it public: " + "; ".join(sorted(borrowed))
