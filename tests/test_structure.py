"""The package's shape: no import circle among trp_edge's modules (function-level imports and importlib calls
included), every module in its layer importing nothing above it, no module over 400 lines and no function over
60 lines (docs/architecture.md draws the layers)."""

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


def _importlib_targets(tree: ast.AST, package: str, files: dict[str, Path]) -> set[str]:
    """The trp_edge modules a module reaches through importlib.import_module: a constant name, or for a name made at
    run time, the string constants of the module-level names it is made from (a registry such as trp_edge's lazy
    exports, `_EXPORTS`), relative names taken from `package`."""
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("import_module")]
    if not calls:
        return set()
    assigned = {t.id: node.value for node in getattr(tree, "body", []) if isinstance(node, ast.Assign | ast.AnnAssign)
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    names: set[str] = set()
    for call in calls:
        arg = call.args[0] if call.args else ast.Constant(None)
        sources = [arg] + [assigned[n.id] for n in ast.walk(arg) if isinstance(n, ast.Name) and n.id in assigned]
        names |= {c.value for src in sources for c in ast.walk(src)
                  if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    out = set()
    for n in names:
        for full in (n, f"{package}{n}" if n.startswith(".") else f"{package}.{n}"):
            if full in files:
                out.add(full)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the trp_edge modules it imports (import statements at any depth, and importlib calls)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        deps: set[str] = _importlib_targets(tree, package, files)
        for node in _imports(tree):
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


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


# the layers, bottom to top (docs/architecture.md): a module imports only from its layer and those below
LAYERS = (
    ("errors", "contracts"),
    ("config", "flops", "latency_table", "targets"),
    ("lowrank", "allocate"),
    ("planning",),
    ("models", "data", "trp", "layers"),
    ("backends", "export", "deployment"),
    ("profile", "transport", "device", "emulate", "tuning_device", "report"),
    ("workflows",),
    ("summary", "cli", "cli_options", "api", "__main__"),
)


def layer_of(module: str) -> int | None:
    parts = module.split(".")[1:]
    for i, names in enumerate(LAYERS):
        if parts and (parts[0] in names or parts[0].split("_")[0] in names):
            return i
    return None


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
    assert "trp_edge.api" in graph["trp_edge.cli"] and "trp_edge.workflows.compress" in graph["trp_edge.api"]
    assert "trp_edge.errors" in graph["trp_edge.backends.ort"]
    # the package's lazy exports reach the workflows through importlib.import_module
    assert "trp_edge.workflows.compress" in graph["trp_edge"] and "trp_edge.config" in graph["trp_edge"]
    assert find_cycle({**graph, "trp_edge.errors": graph["trp_edge.errors"] | {"trp_edge.cli"}})  # a planted circle


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "trp_edge" and layer_of(m) is None)
    assert not unplaced, f"modules with no layer in LAYERS: {unplaced}"
    up = sorted(f"{m} ({layer_of(m)}) -> {d} ({layer_of(d)})" for m, deps in graph.items() if m != "trp_edge"
                for d in deps if layer_of(d) > layer_of(m))
    assert not up, "imports from a layer above: " + "; ".join(up)


def test_the_leaves_and_the_maths_import_nothing_above_them():
    graph = import_graph()
    for leaf in ("trp_edge.lowrank", "trp_edge.config", "trp_edge.latency_table"):
        above = sorted(d for d in reach(graph, leaf) if layer_of(d) > layer_of(leaf))
        assert not above, f"{leaf} reaches {above}"
    assert not reach(graph, "trp_edge.lowrank") & {"trp_edge.latency_table", "trp_edge.allocate"}


def test_compress_reaches_no_device_and_backends_no_workflow():
    graph = import_graph()
    device = sorted(d for d in reach(graph, "trp_edge.workflows.compress")
                    if d == "trp_edge.transport" or d.startswith("trp_edge.device"))
    assert not device, f"trp_edge.workflows.compress reaches {device}"
    banned = ("trp_edge.transport", "trp_edge.emulate", "trp_edge.workflows.deploy", "trp_edge.workflows.calibrate")
    bad = {m: sorted(d for d in graph[m] if d.startswith(banned)) for m in graph if m.startswith("trp_edge.backends")}
    assert not any(bad.values()), bad


def test_no_module_over_400_lines():
    long = [f"{module_name(p)} ({n})" for p in sorted(PKG.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, f"modules over 400 lines: {', '.join(long)}"


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
