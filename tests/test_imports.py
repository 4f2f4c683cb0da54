"""The import graph of kred, read from the source (ast): layers import downwards only.

Two rules (issue 19, part 3):
- no circle between modules of different folders, counting every import of a kred module, at module level or
  inside a function, and the packages an import runs first (`from kred.engine.torch.genred import ...` outside
  engine/torch runs engine/torch/__init__.py);
- no function-level import of a kred module that closes a circle, in one folder or across: lateness may delay an
  OPTIONAL third-party package (ray, pyarrow, torch, cupy, yaml, ...) or a kred module the importer could as well
  import at the top, never hold a circle apart.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import kred

LAYERS = ("engine", "service", "client")
SKIP = {"tests", "benchmarks", "examples", "docs", "deploy", "__pycache__"}

# Old import paths kept where users import them, read on first use (a module __getattr__): (importer, imported).
COMPATIBILITY = {("kred.engine.cluster", "kred.engine.jobs")}    # run_job_file, JobFileError moved to engine.jobs


def sources() -> dict[str, Path]:
    """kred's modules (dotted name -> file): kred/ and the layers mapped beneath it (engine/, service/, client/),
    found where their packages' `__path__` says they are (an install or the source-tree loader)."""
    found = {}
    packages = [("kred", kred)] + [(f"kred.{layer}", importlib.import_module(f"kred.{layer}")) for layer in LAYERS]
    for dotted, package in packages:
        for root in map(Path, package.__path__):
            for file in sorted(root.rglob("*.py")):
                relative = file.relative_to(root)
                if SKIP & set(relative.parts) or (dotted == "kred" and relative.parts[0] in LAYERS):
                    continue
                parts = list(relative.with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join([dotted, *parts])] = file
    return found


MODULES = sources()


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _resolve(importer: str, node: ast.ImportFrom) -> list[str]:
    """The kred modules an ImportFrom reads: `from pkg import mod` reads pkg.mod when that is a module, else pkg."""
    if node.level:
        base = _package(importer).split(".")
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = []
    for alias in node.names:
        full = f"{prefix}.{alias.name}"
        out.append(full if full in MODULES else prefix)
    return [m for m in out if m in MODULES]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported kred module, inside a function?, line) for every import statement of module `name`."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found = []

    def visit(node, late):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue            # annotations only: never executed
            inner = late or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = alias.name
                    while target and target not in MODULES:
                        target = target.rpartition(".")[0]
                    if target:
                        found.append((target, late, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                found.extend((target, late, child.lineno) for target in _resolve(name, child))
            visit(child, inner)

    visit(tree, False)
    # importing kred.a.b.c from outside package kred.a.b runs kred.a.b's __init__ (and kred.a's) first
    for target, late, line in list(found):
        parent = target.rpartition(".")[0]
        while parent.count(".") >= 1 and not (name == parent or name.startswith(parent + ".")):
            found.append((parent, late, line))
            parent = parent.rpartition(".")[0]
    return [(target, late, line) for target, late, line in found if target != name]


def _graph() -> dict[str, list[tuple[str, bool, int]]]:
    return {name: [edge for edge in imports(name) if (name, edge[0]) not in COMPATIBILITY] for name in MODULES}


GRAPH = _graph()


def _folder(name: str) -> str:
    return str(MODULES[name].parent)


def _components() -> list[list[str]]:
    """Strongly connected components of the graph (Tarjan, iterative), every edge counted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for start in MODULES:
        if start in index:
            continue
        work = [(start, iter(GRAPH[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target, _, _ in edges:
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(GRAPH[target])))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    out.append(sorted(component))
    return out


def _describe(component: list[str]) -> str:
    members = set(component)
    edges = [f"  {name} -> {target} (line {line}{', in a function' if late else ''})"
             for name in component for target, late, line in GRAPH[name] if target in members]
    return "\n".join(edges)


def test_the_walk_sees_every_layer():
    names = set(MODULES)
    for expected in ("kred.engine.plan", "kred.engine.formula.ops", "kred.service.app", "kred.client.cli",
                     "kred.engine.cluster.cluster"):
        assert expected in names
    assert ("kred.engine.plan", False) in {(t, late) for t, late, _ in GRAPH["kred.engine.run"]}


def test_no_circle_between_folders():
    circles = [c for c in _components() if len(c) > 1 and len({_folder(m) for m in c}) > 1]
    assert not circles, "import circles across folders:\n" + "\n\n".join(_describe(c) for c in circles)


def test_no_late_import_hides_a_circle():
    """A function-level import of a kred module whose target reaches the importer back (through module-level
    imports) is a circle held apart by lateness; every such import is listed."""
    top = {name: {t for t, late, _ in edges if not late} for name, edges in GRAPH.items()}

    def reaches(source, goal):
        seen, todo = set(), [source]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(top[node])
        return False

    hidden = [f"{name}:{line} imports {target} late, and {target} imports {name} back"
              for name, edges in GRAPH.items() for target, late, line in edges
              if late and reaches(target, name)]
    assert not hidden, "\n".join(hidden)


def test_finds_a_circle_when_there_is_one(tmp_path):
    """The checker itself: two modules of different folders importing each other (one late) are reported."""
    global MODULES, GRAPH
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "__init__.py").write_text("")
    (tmp_path / "b" / "__init__.py").write_text("")
    (tmp_path / "a" / "x.py").write_text("from ..b import y\n")
    (tmp_path / "b" / "y.py").write_text("def f():\n    from ..a import x\n")
    saved = MODULES, GRAPH
    try:
        MODULES = {"kred.a": tmp_path / "a" / "__init__.py", "kred.b": tmp_path / "b" / "__init__.py",
                   "kred.a.x": tmp_path / "a" / "x.py", "kred.b.y": tmp_path / "b" / "y.py"}
        GRAPH = _graph()
        assert GRAPH["kred.b.y"] == [("kred.a.x", True, 2), ("kred.a", True, 2)]
        assert [c for c in _components() if len(c) > 1] == [["kred.a.x", "kred.b.y"]]
    finally:
        MODULES, GRAPH = saved
