"""The import structure: no module circles, and no import that runs back up the floors.

The floors, lowest first: ``kernels/`` (kernels and their references), ``models/`` (networks, families,
samplers), ``service/`` (engine, queue, HTTP, worker), ``service/cli/`` (the commands). A module may
import its own floor or a lower one; a circle among modules (at module level or inside functions)
is refused wherever it is. The walk reads the source with ``ast``: nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "models", "service")
FLOORS = (("service.cli", 3), ("service", 2), ("models", 1), ("kernels", 0))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of ``known`` that the module ``name`` imports anywhere in its source (functions too)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        # ``from a.b import c``: c may be a module (a.b.c) or a name in a.b.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                add(full if full in known else origin)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            files[module_name(path, root)] = path
    known = set(files)
    return {name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None. A package's ``__init__`` importing its own
    modules is not a circle with them when they import only its names (that is Python's own order)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue            # a package and its own submodules
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def floor(name: str) -> int:
    for prefix, level in FLOORS:
        if name == prefix or name.startswith(prefix + "."):
            return level
    raise ValueError(name)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def test_the_tree_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_runs_back_up_the_floors():
    assert upward_imports(import_graph()) == []


def test_commands_import_no_other_command_module():
    graph = import_graph()
    commands = {n for n in graph if n.startswith("service.cli.") and n not in ("service.cli.__main__",)}
    shared = {n for n in commands if not _is_command(n)}
    offenders = sorted(f"{a} -> {b}" for a in commands for b in graph[a] if b in commands - shared)
    assert offenders == []


def _is_command(name: str) -> bool:
    """A command module registers a subcommand (``def register``); the rest of service/cli is shared help."""
    path = ROOT / (name.replace(".", "/") + ".py")
    return path.exists() and any(isinstance(n, ast.FunctionDef) and n.name == "register"
                                 for n in ast.parse(path.read_text()).body)


# -- the walk itself finds what it must (a tree written here) -----------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("a_text", ["from pkg import b\n", "from . import b\n",
                                    "def f():\n    from pkg.b import g\n", "import pkg.b as bee\n"])
def test_walk_finds_a_circle_however_it_is_written(tmp_path, a_text):
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": a_text, "pkg/b.py": "from pkg.a import x\n"})
    assert find_cycle(import_graph(root, ("pkg",))) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])


def test_walk_passes_a_tree_without_circles(tmp_path):
    root = _tree(tmp_path, {"pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "from pkg.b import y\nx = y\n",
                            "pkg/b.py": "y = 1\n"})
    assert find_cycle(import_graph(root, ("pkg",))) is None


def test_walk_finds_an_upward_import(tmp_path):
    root = _tree(tmp_path, {"kernels/__init__.py": "", "kernels/k.py": "from models.m import z\n",
                            "models/__init__.py": "", "models/m.py": "z = 1\n", "service/__init__.py": ""})
    assert upward_imports(import_graph(root)) == ["kernels.k -> models.m"]
