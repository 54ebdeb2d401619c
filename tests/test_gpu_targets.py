"""The fused NAG-GD step compiles for A100 (sm_80) and H100/H200 (sm_90) without a GPU, through the
launcher's own specialisation, at the digits and EqM-XL/2 shapes in float32 and bfloat16; the
launches the sampler makes on CUDA (the plan's K) do not spill registers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.sampler import MAX_ROWS_PER_SAMPLE

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compile, do not interpret
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_target_shape_dtype_and_tuning_config_compiles(compiled):
    seen = {(r["shape"], r["arch"], r["dtype"], r["K"], r["BLOCK"]) for r in compiled}
    # Every block size the autotuner keeps after pruning: one for 64 elements, three for 4096.
    for arch in (80, 90):
        for dtype in ("fp32", "bf16"):
            for k in (2, MAX_ROWS_PER_SAMPLE):
                assert ("digits", arch, dtype, k, 1024) in seen
                for block in (1024, 2048, 4096):
                    assert ("EqM-XL/2", arch, dtype, k, block) in seen
    assert len(seen) == len(compiled) == 2 * 2 * 2 * (1 + 3)
    for r in compiled:
        assert 0 < r["registers"] <= 255 and r["cubin_bytes"] > 0, r


def test_the_samplers_launches_do_not_spill(compiled):
    plan = [r for r in compiled if r["K"] == MAX_ROWS_PER_SAMPLE]
    assert plan
    spilling = [r for r in plan if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling
