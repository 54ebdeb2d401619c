"""A missing third-party package as one line that names it and the command that installs it.

Used wherever an import can fail on a machine that lacks a package: the ``eqm`` commands at start, and
the lazy imports of optional parts (the SD-VAE codec needs ``diffusers``, the digits trainer
``scikit-learn``). Standard library only: it must work when everything else is missing.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re

PROJECT = "eqm-serve"

# Import names whose distribution is named otherwise.
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "multipart": "python-multipart",
                 "python_multipart": "python-multipart", "fastapi_offline": "fastapi-offline",
                 "prometheus_client": "prometheus-client", "safetensors": "safetensors"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_of(module: str) -> str:
    """The distribution that provides top-level module ``module`` (installed or not)."""
    top = module.split(".")[0]
    return DISTRIBUTIONS.get(top, top.replace("_", "-"))


def extra_providing(distribution: str) -> str | None:
    """The project's extra that lists ``distribution`` ("" for a base dependency, None if none does)."""
    try:
        requirements = md.requires(PROJECT) or []
    except md.PackageNotFoundError:
        return None
    wanted = _normalise(distribution)
    found = None
    for requirement in requirements:
        name = _normalise(re.split(r"[\s<>=!~;\[(@]", requirement, maxsplit=1)[0])
        if name != wanted:
            continue
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra is None:
            return ""
        if found is None and extra.group(1) != "test":
            found = extra.group(1)
    return found


def install_hint(module: str) -> str:
    """How to install the package that provides ``module``: ``pip install ...``."""
    distribution = distribution_of(module)
    extra = extra_providing(distribution)
    if extra:
        return f'pip install "{PROJECT}[{extra}]" (from a clone: pip install -e ".[{extra}]")'
    if extra == "":
        return f"pip install {distribution} (a dependency of {PROJECT}: reinstall it, e.g. pip install -e .)"
    return f"pip install {distribution}"


def missing_package(exc: BaseException) -> str | None:
    """One line for an import of a third-party package that is not installed; None for any other error
    (a module of the project itself, or a package that is installed but broken)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    if top in ("models", "kernels", "service"):
        return None
    try:
        if exc.name != top and importlib.util.find_spec(top) is not None:
            return None                     # the package is there; a part of it is missing: a broken install
    except (ImportError, ValueError):
        pass
    return f"the Python package '{distribution_of(top)}' is not installed (module {exc.name}): {install_hint(top)}"
