"""Registers and spills of the fused NAG-GD step compiled for sm_80 / sm_90 on this (GPU-less) machine.

``python bench/gpu_targets.py`` compiles every case of ``kernels.compile_check`` (Triton's compiler and
its ptxas, the launcher's specialisation) and writes its section of bench/RESULTS.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import results  # noqa: E402

TITLE = "## Fused step compiled for GPU targets (no GPU): registers and spills"


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"gpu_targets: compile failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    import torch
    import triton
    lines = [TITLE, "",
             f"{datetime.date.today()}, compiled on a CPU-only machine ({platform.machine()}, no GPU), Triton "
             f"{triton.__version__} and its bundled ptxas, torch {torch.__version__}. `python bench/gpu_targets.py`; "
             "checked on every commit by tests/test_gpu_targets.py. Cases: int32 indices, freeze_finished, every "
             "block size the autotuner keeps after pruning; K = 8 is the plan width every sampler launch on CUDA "
             "uses, K = 2 a direct CFG launch. Registers per thread / spill stores (bytes):", "",
             "| shape | dtype | K | BLOCK, warps | sm_80 | sm_90 |", "|---|---|---:|---|---:|---:|"]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["shape"], r["dtype"], r["K"], r["BLOCK"], r["num_warps"]), {})[r["arch"]] = r
    for (shape, dtype, k, block, warps), arch in by_case.items():
        cell = lambda a: f"{arch[a]['registers']} / {arch[a]['spill_stores']}"   # noqa: E731
        lines.append(f"| {shape} | {dtype} | {k} | {block}, {warps} | {cell(80)} | {cell(90)} |")
    spills = [r for r in rows if r["spill_stores"]]
    lines += ["", f"{len(rows)} compiles, {len(spills)} with spills"
              + (": " + "; ".join(f"{r['shape']} {r['dtype']} K={r['K']} BLOCK={r['BLOCK']} sm_{r['arch']} "
                                  f"{r['spill_stores']} B" for r in spills) if spills else "")
              + ". What runs on a GPU box (the plan's K = 8) spills nothing; timings need the GPU itself "
              "(bench/gpu_proof.py)."]
    results.publish(TITLE, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
