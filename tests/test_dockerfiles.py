"""The Dockerfiles' stated torch / Triton / CUDA versions lie in the range pyproject.toml allows (whose
Triton lower bound tests/test_triton_versions.py runs), and the GPU image has what Triton needs at run
time: a C compiler for its launcher, a non-root user, a health check, a build-time version check."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from test_compose import dockerfile

ROOT = Path(__file__).resolve().parents[1]


def pyproject_specifier(name: str, extra: str | None):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines if Requirement(line).name == name]
    assert len(reqs) == 1, f"pyproject.toml: expected one {name} requirement in {extra or 'dependencies'}"
    return reqs[0].specifier


def args_of(instructions) -> dict[str, str]:
    """ARG defaults, with ${NAME} references to earlier ARGs expanded."""
    values: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return values


def test_triton_extras_agree_on_one_range():
    assert pyproject_specifier("triton", "triton") == pyproject_specifier("triton", "test")


def test_gpu_image_versions_lie_in_the_tested_range():
    gpu = dockerfile("Dockerfile.gpu")
    args = args_of(gpu)
    torch_v, triton_v, cuda_v = Version(args["TORCH_VERSION"]), Version(args["TRITON_VERSION"]), args["CUDA_VERSION"]
    triton_range = pyproject_specifier("triton", "triton")
    assert triton_v in triton_range, f"Dockerfile.gpu states Triton {triton_v}, outside pyproject's {triton_range}"
    assert torch_v in pyproject_specifier("torch", None), f"Dockerfile.gpu states torch {torch_v}"
    # The base is the official image of exactly those versions, and the build checks them.
    base = args["BASE_IMAGE"]
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(str(torch_v))}-cuda{re.escape(cuda_v)}-cudnn\d+-(runtime|devel)",
                        base), base
    assert ("FROM", "${BASE_IMAGE}") in gpu
    check = next(rest for word, rest in gpu if word == "RUN" and "triton.__version__" in rest)
    assert "${TORCH_VERSION}" in check and "${TRITON_VERSION}" in check and "${CUDA_VERSION}" in check
    assert "torch==${TORCH_VERSION}" in " ".join(rest for word, rest in gpu if word == "RUN")


def test_gpu_image_has_a_c_compiler_a_user_and_a_health_check():
    gpu = dockerfile("Dockerfile.gpu")
    base = args_of(gpu)["BASE_IMAGE"]
    runs = [rest for word, rest in gpu if word == "RUN"]
    assert base.endswith("-devel") or any("apt-get install" in r and re.search(r"\bgcc\b", r) for r in runs)
    users = [rest for word, rest in gpu if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = next(rest for word, rest in gpu if word == "HEALTHCHECK")
    assert "9400/metrics" in health
    # Dependencies install before the source is copied (a source change keeps that layer).
    words = [(word, rest) for word, rest in gpu]
    deps = next(i for i, (w, r) in enumerate(words) if w == "RUN" and "requirements" in r)
    first_source = next(i for i, (w, r) in enumerate(words) if w == "COPY" and r.split()[0] == "service")
    assert deps < first_source


def test_api_image_torch_lies_in_the_range():
    args = args_of(dockerfile("Dockerfile"))
    assert Version(args["TORCH_VERSION"]) in pyproject_specifier("torch", None)
