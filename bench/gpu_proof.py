"""The first run on a GPU machine, in one command: ``python bench/gpu_proof.py``.

On a machine with the project installed (``pip install -e ".[test]"``) and one or more NVIDIA GPUs it
runs, each step in its own process with its own time limit and the whole within 8 minutes:

1. ``env``       device, driver, torch / Triton / CUDA versions, the C compiler Triton needs;
2. ``kernel``    the compiled fused step against the torch reference on CUDA (fp32 / bf16, K = 1..3, 8);
3. ``gpu_tests`` the GPU tests of the suite (compiled kernel, sampler through the kernel, target compiles);
4. ``modes``     eager / torch.compile / CUDA-graph forwards: warm-up time, agreement with eager, and the
                 out-of-memory fallback (chunked forward) under each;
5. ``two_gpus``  the same requests on cuda:0 and cuda:1 in two processes: byte-identical images;
6. ``engine``    EqM-XL/2 with random weights, 249 updates with CFG, 16 / 64 / 256 images: the engine's
                 sampler (bf16, fused step) against the official loop restated (fp32 + TF32 eager, the
                 same batch), side by side.

It writes every step's result (or its error / time-out) to one JSON file (``--json``, default
bench/gpu_proof.json) and its section of bench/RESULTS.md. ``--dry-run`` (any machine, CI) runs each
step's imports and construction only, in the same child processes, and writes nothing unless asked.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TITLE = "## First run on a GPU machine (bench/gpu_proof.py)"
TOTAL_BUDGET_S = 480


def run_step(name: str, dry: bool, out: Path) -> None:
    """Child process: one step, its result (or partial result) written to ``out``."""
    import gpu_proof_steps as steps
    func, _ = steps.STEPS[name]

    def save(result):
        out.write_text(json.dumps({"status": "partial", "result": result}, default=str))

    kwargs = {"save": save} if name == "engine" else {}
    t0 = time.perf_counter()
    result = func(dry, **kwargs)
    out.write_text(json.dumps({"status": "ok", "seconds": time.perf_counter() - t0, "result": result}, default=str))


def orchestrate(dry: bool, only: list[str] | None, budget_s: float) -> dict:
    import gpu_proof_steps as steps
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": dry, "steps": {}}
    start = time.monotonic()
    env = dict(os.environ)
    if not dry:
        env.pop("TRITON_INTERPRET", None)       # the point is the compiled kernel
    for name, (_, limit) in steps.STEPS.items():
        if only and name not in only:
            continue
        left = budget_s - (time.monotonic() - start)
        if left < 5:
            report["steps"][name] = {"status": "not run", "error": f"the {budget_s:.0f} s budget was spent"}
            continue
        timeout = min(limit, left)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "step.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--step-out", str(out)]
            cmd += ["--dry-run"] if dry else []
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
                failed = proc.returncode != 0
                error = (proc.stderr.strip().splitlines() or ["exit status %d" % proc.returncode])[-1] if failed else None
            except subprocess.TimeoutExpired:
                failed, error = True, f"timed out after {timeout:.0f} s"
            entry = json.loads(out.read_text()) if out.exists() else {}
            if failed:
                entry.update(status="timed out" if "timed out" in error else "failed", error=error)
            entry["wall_s"] = round(time.monotonic() - t0, 1)
        report["steps"][name] = entry
        print(f"{name:>9}: {entry['status']} ({entry['wall_s']} s){' - ' + entry['error'] if failed else ''}",
              file=sys.stderr, flush=True)
    report["total_s"] = round(time.monotonic() - start, 1)
    report["ok"] = all(s["status"] == "ok" for s in report["steps"].values())
    return report


def section(report: dict) -> str:
    steps = report["steps"]
    env = steps.get("env", {}).get("result", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in env.get("gpus", [])) or "no GPU"
    lines = [TITLE, "",
             f"{report['date']}, {gpus}; torch {env.get('torch')}, Triton {env.get('triton')}, CUDA "
             f"{env.get('torch_cuda')}, driver {env.get('driver')}. `python bench/gpu_proof.py`, "
             f"{report['total_s']} s in all.", "",
             "| step | status | wall (s) |", "|---|---|---:|"]
    for name, s in steps.items():
        lines.append(f"| {name} | {s['status']}{': ' + s['error'] if s.get('error') else ''} | {s.get('wall_s', '')} |")
    engine = steps.get("engine", {}).get("result") or {}
    if engine and not engine.get("dry"):
        lines += ["", "EqM-XL/2, random weights, 249 updates, CFG 1.5. Baseline: the official sampling loop "
                  "restated, fp32 with TF32, eager, the same batch, run in the same process.", "",
                  "| images | engine bf16 (images/s) | official fp32+TF32 (images/s) | engine / official | "
                  "relative latent difference |", "|---:|---:|---:|---:|---:|"]
        for n, r in engine.items():
            lines.append(f"| {n} | {r['engine_bf16']['images_per_s']:.2f} | {r['official_fp32_tf32']['images_per_s']:.2f}"
                         f" | {r['speedup']:.2f}x | {r['relative_difference']:.1e} |")
    modes = steps.get("modes", {}).get("result") or {}
    if modes and not modes.get("dry"):
        lines += ["", "Forward modes (digits model, 48 rows): " + "; ".join(
            f"{m} warm-up {r['warmup_s']:.1f} s over {r['buckets']} buckets, vs eager {r['max_diff_vs_eager']:.1e}, "
            f"chunked {r['chunked_max_diff']:.1e}" for m, r in modes.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the first run on a GPU machine, in one command")
    p.add_argument("--dry-run", action="store_true", help="imports and construction only (any machine)")
    p.add_argument("--only", help="comma-separated steps to run (default: all)")
    p.add_argument("--json", type=Path, help="where the JSON report goes (default bench/gpu_proof.json; "
                   "with --dry-run, nowhere unless given)")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    p.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all steps together")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--step-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        run_step(args.step, args.dry_run, args.step_out)
        return 0
    import gpu_proof_steps as steps
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = set(only or ()) - set(steps.STEPS)
    if unknown:
        p.error(f"--only: unknown step(s) {', '.join(sorted(unknown))}; choose from {', '.join(steps.STEPS)}")
    report = orchestrate(args.dry_run, only, args.budget)
    path = args.json or (None if args.dry_run else ROOT / "bench" / "gpu_proof.json")
    if path:
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {path}", file=sys.stderr)
    text = section(report)
    print(text)
    if not args.dry_run and not args.no_write:
        import results
        results.write_section(TITLE, text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
