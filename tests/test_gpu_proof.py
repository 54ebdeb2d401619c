"""bench/gpu_proof.py, the one command for the first GPU run: its --dry-run passes on this machine
(every step's imports and construction, in the same child processes, with their time limits)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_proof.py"


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_only_its_json(tmp_path):
    results = (ROOT / "bench" / "RESULTS.md").read_bytes()
    out = tmp_path / "proof.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["ok"]
    assert list(report["steps"]) == ["env", "kernel", "gpu_tests", "modes", "two_gpus", "engine"]
    assert all(s["status"] == "ok" for s in report["steps"].values()), report["steps"]
    # The GPU tests it would run are collected (the compiled-kernel test among them).
    assert "collected" in report["steps"]["gpu_tests"]["result"]["summary"]
    # The restated official loop agrees with the engine's sampler (CPU, float32), so the GPU comparison is fair.
    assert report["steps"]["engine"]["result"]["tiny_model_relative_difference"] < 1e-5
    assert "## First run on a GPU machine" in proc.stdout
    assert (ROOT / "bench" / "RESULTS.md").read_bytes() == results


def test_unknown_step_is_a_one_line_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "warp"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown step(s) warp; choose from env, kernel" in proc.stderr
