"""The package's shape: no import circle among trp_edge's modules (function-level imports included) and no
function over 60 lines."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "trp_edge"
MAX_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST):
    """Every import statement of a module, at any depth, except those under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                todo.extend(child.orelse)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the trp_edge modules it imports."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                deps.add(sub if sub in files else base)
        graph[name] = {d for d in deps if d in files and d != name and d != "trp_edge"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_walker_sees_function_level_imports_and_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    # cli imports compress inside a function only: the walk must see it
    assert "trp_edge.workflows.compress" in graph["trp_edge.cli"]
    assert "trp_edge.errors" in graph["trp_edge.backends.ort"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_long_functions():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{module_name(path)}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_LINES} lines: {', '.join(long)}"


def test_backends_reach_no_device_and_run_no_workflow():
    """A backend is given what it needs from above (TVM's tuning measurer: trp_edge.tuning_device), never imports
    it, even inside a function."""
    above = ("trp_edge.transport", "trp_edge.emulate", "trp_edge.profile", "trp_edge.device", "trp_edge.workflows",
             "trp_edge.tuning_device")
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith(above)) for m, deps in graph.items()
           if m.startswith("trp_edge.backends")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_modules_stay_short_and_the_tvm_package_imports_no_tvm():
    long = [f"{module_name(p)} ({n})" for p in sorted((PKG / "backends").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, f"backend modules over 400 lines: {', '.join(long)}"
    code = "import sys, trp_edge.backends.tvm as t; t.build, t.load, t.tune; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(PKG.parent)})
