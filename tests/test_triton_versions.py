"""The kernel module under the oldest Triton pyproject.toml allows (the GPU image's): it imports with and
without the interpreter, and the fused step matches the torch reference under that Triton's interpreter.

That Triton is installed from PyPI into a cache folder (``~/.cache/eqm-serve/``, reused by later runs)
and put ahead of the venv's own on ``PYTHONPATH`` of a child process; torch stays the venv's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_dockerfiles import pyproject_specifier

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, torch, triton
from packaging.version import Version
want = sys.argv[1]
assert Version(triton.__version__) == Version(want), f"child runs triton {triton.__version__} from {triton.__file__}, not {want}"
import kernels.nag_step as ns
import models.sampler, service.runner   # the worker's import chain
print("interpreting", ns._INTERPRETING)
if ns._INTERPRETING:
    sys.path.insert(0, "tests")
    from test_nag_step import make_case, run, assert_state_close
    for C, H, W, K, G, dt in [(4, 32, 32, 8, 3, torch.bfloat16), (1, 8, 8, 2, 1, torch.float32)]:
        st, G = make_case(C, H, W, K, G=G, out_dtype=dt, mi_dtype=dt, S=6, A=4, seed=3)
        assert_state_close(run(ns.nag_step_triton, st, G), run(ns.nag_step_reference, st, G))
    print("matches the reference")
"""


def oldest_triton() -> str:
    spec = pyproject_specifier("triton", "triton")
    lows = [s.version for s in spec if s.operator == ">="]
    assert len(lows) == 1, f"pyproject.toml's triton range {spec} needs one lower bound"
    return lows[0]


@pytest.fixture(scope="module")
def oldest_triton_dir() -> tuple[str, Path]:
    version = oldest_triton()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    target = Path.home() / ".cache" / "eqm-serve" / f"triton-{version}-{tag}"
    if not (target / "triton" / "__init__.py").is_file() or not (target / ".complete").is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                               "--target", str(target), f"triton=={version}"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"pip could not install triton=={version}: {proc.stderr[-2000:]}"
        (target / ".complete").write_text(version)
    return version, target


@pytest.mark.slow
@pytest.mark.parametrize("interpret", ["1", "0"])
def test_kernel_module_under_the_oldest_allowed_triton(oldest_triton_dir, interpret):
    version, target = oldest_triton_dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]), "TRITON_INTERPRET": interpret}
    proc = subprocess.run([sys.executable, "-c", CHILD, version], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"interpreting {interpret == '1'}" in proc.stdout
    if interpret == "1":
        assert "matches the reference" in proc.stdout
