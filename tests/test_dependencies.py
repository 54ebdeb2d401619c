"""Every third-party module the installed packages import comes from a requirement in pyproject.toml.

A package that only arrives as some other package's dependency can vanish with that package's next
release (``httpx`` once came with ``huggingface-hub``), and the service then dies at its first
command on a fresh machine. The check walks the source of the installed ``models``, ``kernels`` and
``service`` packages (every ``import``, also those inside functions), maps each top-level module to the
distribution that provides it, and requires:

- an import that runs when its module is imported (module level, not under ``try ... except
  ImportError``) to come from a base dependency;
- any other import (inside a function, or guarded) to come from a base dependency or an extra.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "kernels", "service")

# Import names whose distribution is named otherwise, for modules that are not installed here (an
# optional package may be absent): the installed ones are looked up in their metadata.
KNOWN_DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "multipart": "python-multipart",
                       "python_multipart": "python-multipart", "fastapi_offline": "fastapi-offline",
                       "prometheus_client": "prometheus-client"}


def normalise(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements(pyproject: Path = ROOT / "pyproject.toml") -> tuple[set[str], set[str]]:
    """(base dependencies, dependencies of any extra), as normalised distribution names."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]

    def names(requirements):
        return {normalise(re.split(r"[\s<>=!~;\[(@]", r, maxsplit=1)[0]) for r in requirements}

    extras = set()
    for requirements in project.get("optional-dependencies", {}).values():
        extras |= names(requirements)
    return names(project["dependencies"]), extras


@dataclass(frozen=True)
class Import:
    module: str          # top-level module name
    where: str           # file:line
    at_import_time: bool  # runs when its module is imported, unguarded


def _guarded(node: ast.Try) -> bool:
    for handler in node.handlers:
        caught = handler.type
        names = [caught] if not isinstance(caught, ast.Tuple) else list(caught.elts)
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
            return True
    return False


def imports_of(path: Path, root: Path | None = None) -> list[Import]:
    """Absolute imports of one source file (named relative to ``root``, default its folder's parent),
    marked by whether they run unguarded at import time."""
    name = path.relative_to(root or path.parents[1])
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
                continue
            if isinstance(child, ast.Try) and _guarded(child):
                for part in child.body:
                    visit_one(part, False)
                for part in (*child.handlers, *child.orelse, *child.finalbody):
                    visit(part, eager) if not isinstance(part, ast.stmt) else visit_one(part, eager)
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]), eager)     # the `if` branch never runs
                continue
            visit_one(child, eager)

    def visit_one(child: ast.AST, eager: bool) -> None:
        modules = []
        if isinstance(child, ast.Import):
            modules = [alias.name for alias in child.names]
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            modules = [child.module]
        for module in modules:
            found.append(Import(module.split(".")[0], f"{name}:{child.lineno}", eager))
        visit(child, eager)

    visit(tree, True)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def installed_sources() -> list[tuple[Path, Path]]:
    """``(source file, folder holding its package)`` for the installed packages (where the running
    interpreter imports them from)."""
    files = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"package {package} is not installed"
        for location in spec.submodule_search_locations:
            files += [(path, Path(location).parent) for path in sorted(Path(location).rglob("*.py"))]
    return files


def distribution_of(module: str, provided: dict[str, list[str]]) -> str:
    if module in provided:
        return normalise(provided[module][0])
    return normalise(KNOWN_DISTRIBUTIONS.get(module, module))


def undeclared_imports(base: set[str], extras: set[str], files: list[tuple[Path, Path]]) -> list[str]:
    """One line per import that no declared requirement provides (empty when everything is declared)."""
    provided = md.packages_distributions()
    own = set(PACKAGES)
    problems = []
    for path, root in files:
        for imp in imports_of(path, root):
            if imp.module in own or imp.module in sys.stdlib_module_names or imp.module == "__future__":
                continue
            dist = distribution_of(imp.module, provided)
            if imp.at_import_time and dist not in base:
                where = "only in an extra" if dist in extras else "not declared"
                problems.append(f"{imp.where}: imports {imp.module} at import time; {dist} is {where} "
                                "(a base dependency in pyproject.toml is needed)")
            elif dist not in base | extras:
                problems.append(f"{imp.where}: imports {imp.module}; {dist} is not a declared requirement")
    return problems


def test_every_imported_package_is_declared():
    base, extras = declared_requirements()
    problems = undeclared_imports(base, extras, installed_sources())
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_removed_dependency(tmp_path):
    """The same check, on a pyproject.toml without httpx (the webhook sender's HTTP client), reports it."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    stripped = re.sub(r'^\s*"httpx[^"]*",\n', "", text, count=1, flags=re.M)
    assert stripped != text, "httpx is not a base dependency line of pyproject.toml"
    (tmp_path / "pyproject.toml").write_text(stripped, encoding="utf-8")
    base, extras = declared_requirements(tmp_path / "pyproject.toml")
    problems = undeclared_imports(base, extras, installed_sources())
    assert any("service/webhooks.py" in p and "httpx" in p for p in problems), problems


def test_guarded_and_lazy_imports_may_come_from_extras(tmp_path):
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("try:\n    import triton\nexcept ImportError:\n    triton = None\n"
                      "def f():\n    import yaml\n"
                      "import tqdm\n", encoding="utf-8")
    found = {(i.module, i.at_import_time) for i in imports_of(source)}
    assert found == {("triton", False), ("yaml", False), ("tqdm", True)}
    problems = undeclared_imports({"tqdm"}, {"triton"}, [(source, tmp_path)])
    assert problems == ["pkg/mod.py:6: imports yaml; pyyaml is not a declared requirement"]
    assert undeclared_imports(set(), {"tqdm", "triton", "pyyaml"}, [(source, tmp_path)]) == [
        "pkg/mod.py:7: imports tqdm at import time; tqdm is only in an extra (a base dependency in "
        "pyproject.toml is needed)"]


# A finder that makes one package absent, as on a machine that never installed it.
HIDE_PACKAGE = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
from service.cli import main
sys.exit(main({argv!r}))
"""


def _run_without(package: str, argv: list[str], tmp_path: Path):
    import subprocess
    code = HIDE_PACKAGE.format(hidden=package, argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_serve_without_a_package_is_one_line_naming_it(tmp_path):
    """`eqm serve` on a machine without httpx: exit 2, one line naming the package and the install command,
    before anything starts (no Redis, no worker, no listening port)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _run_without("httpx", ["serve", "--port", str(port), "--device", "cpu"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("eqm serve: error: the Python package 'httpx' is not installed"), lines[0]
    assert "pip install" in lines[0]
    with socket.socket() as s:                       # nothing listens: the port is free again
        s.bind(("127.0.0.1", port))


def test_worker_without_a_package_is_one_line(tmp_path):
    """The worker's own imports (here numpy's absence would be a broken install; take prometheus_client,
    which only the worker's metrics import): one line and exit 2, which the supervisor does not restart."""
    result = _run_without("prometheus_client", ["worker", "--devices", "cpu", "--redis-url", "redis://127.0.0.1:1"],
                          tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "the Python package 'prometheus-client' is not installed (module prometheus_client): pip install " \
           "prometheus-client" in result.stderr


def test_vae_codec_without_diffusers_names_the_package(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    code = HIDE_PACKAGE.split("from service.cli")[0].format(hidden="diffusers") + (
        "from models.codecs import SDVAECodec, CodecError\n"
        f"try:\n    SDVAECodec({str(tmp_path)!r})\nexcept CodecError as exc:\n    print(exc)\n")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("the SD-VAE codec needs diffusers: the Python package 'diffusers' is not "
                                 "installed (module diffusers"), out.stdout
