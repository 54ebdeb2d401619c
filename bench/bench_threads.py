"""CPU worker threads: images/s of the worker's engine at 1 and 2 torch threads, idle and beside a busy process.

Each measurement is a fresh process that builds the engine exactly as a CPU worker does
(``service.worker.build_engine``: bundled digits model, warm-up of every bucket, ``--threads N``)
and then runs one 20-image job (labels 0..9 twice, the model's recommended sampler: NAG-GD, step
0.05, mu 0.3, guidance 1.5, adaptive stop at ||grad|| < 1, at most 60 updates), timed from its
admission to its last decoded image. Configurations alternate run by run, so drifts of a shared
machine spread over all of them; the figure is the median with its range.

"busy": one extra process spins on a core for the whole run, as other work on a shared machine
does; "no spinner": without it (the machine's other work still runs: its load average is reported).
The default of ``eqm worker`` / ``eqm serve`` for CPU workers comes from this table.

Usage:
  python bench/bench_threads.py [--repeats 5] [--threads 1,2] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # `python bench/bench_threads.py` from anywhere

from bench import results         # noqa: E402

SECTION_TITLE = "## CPU worker threads"
IMAGES = 20


def measure(threads: int) -> dict:
    """One run in this process: build the worker's engine with ``threads``, time one 20-image job."""
    from models.eqm.digits import DIGITS_DEFAULTS
    from service.jobstore import ImageSpec, JobSpec, SamplerSpec
    from service.metrics import Metrics
    from service.worker import WorkerConfig, build_engine

    t0 = time.perf_counter()
    engine = build_engine(WorkerConfig(redis_url="unused", device="cpu", threads=threads), Metrics())
    load_s = time.perf_counter() - t0
    defaults = DIGITS_DEFAULTS.for_checkpoint()       # what the bundled weights record as recommended
    sampler = SamplerSpec(sampler=defaults["sampler"], step_size=defaults["step_size"], mu=defaults["mu"],
                          max_steps=defaults["max_steps"], grad_norm_threshold=defaults["grad_norm_threshold"])
    job = JobSpec(kind="generate", model="digits", images=[ImageSpec(seed=i, labels=[i % 10]) for i in range(IMAGES)],
                  cfg_scale=defaults["cfg_scale"], sampler=sampler)
    t0 = time.perf_counter()
    engine.add_job(job, None)
    done = 0
    while engine.has_work:
        done += len(engine.step().images)
    seconds = time.perf_counter() - t0
    assert done == IMAGES, done
    return {"threads": threads, "seconds": seconds, "images_per_s": IMAGES / seconds, "load_s": load_s}


def run_child(threads: int, busy: bool) -> dict:
    load = os.getloadavg()[0]                      # the shared machine's own load, before this run
    spinner = None
    if busy:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("OMP_NUM_THREADS", None)          # the worker's own --threads decides
        out = subprocess.run([sys.executable, __file__, "--child", str(threads)], env=env, check=True,
                             capture_output=True, text=True)
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": load}
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def section(table: dict, repeats: int, cpus: int) -> str:
    date = datetime.date.today().isoformat()
    loads = [r["load"] for runs in table.values() for r in runs]
    lines = [SECTION_TITLE, "",
             f"{date}, {platform.processor() or platform.machine()}, {cpus} CPU cores, torch "
             f"{_torch_version()}, Python {platform.python_version()}. A shared machine: other work (tests and "
             "builds of other people) ran beside these runs, 1-minute load average "
             f"{min(loads):.1f}-{max(loads):.1f} on {cpus} cores before them, so the absolute figures move and "
             "*no spinner* is not an idle machine; the configurations alternated run by run.",
             "",
             f"One {IMAGES}-image job of the bundled digits model through the CPU worker's engine "
             "(`service.worker.build_engine`, recommended sampler: NAG-GD, adaptive stop, at most 60 updates, "
             f"guidance 1.5), from admission to the last decoded image; median of {repeats} fresh processes "
             "(min-max). *busy*: the benchmark adds one process spinning on a core throughout; *no spinner*: it "
             "does not.",
             "",
             "| torch threads | machine | images/s, median (min-max) | seconds per job, median |",
             "|---|---|---|---|"]
    for (threads, busy), runs in table.items():
        ips = [r["images_per_s"] for r in runs]
        secs = [r["seconds"] for r in runs]
        lines.append(f"| {threads} | {'busy' if busy else 'no spinner'} | {statistics.median(ips):.1f} "
                     f"({min(ips):.1f}-{max(ips):.1f}) | {statistics.median(secs):.2f} |")
    best = {}
    for busy in (False, True):
        rows = {t: statistics.median(r["images_per_s"] for r in runs) for (t, b), runs in table.items() if b == busy}
        if rows:
            best[busy] = max(rows, key=rows.get)
            ratio = rows.get(1, 0) / rows[max(rows)] if rows.get(max(rows)) else float("nan")
            lines.append("")
            lines.append(f"{'Busy' if busy else 'No spinner'}: 1 thread gives {ratio:.2f}x the images/s of "
                         f"{max(rows)} threads.")
    lines += ["", f"Default chosen: `--threads 1` for CPU workers (fastest here: {best.get(False)} thread(s) without the "
              f"spinner, {best.get(True)} with it). The model is small (8x8 digits, 4 blocks of width 128): a step is "
              "dozens of small matmuls, where a second thread adds synchronisation at every op and, when a core is "
              "taken by another process, waits for it. `--threads 0` gives torch's default (every core).", ""]
    return "\n".join(lines)


def _torch_version() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                         text=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per configuration")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch bench/RESULTS.md")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    configs = [(t, busy) for busy in (False, True) for t in threads]
    table: dict[tuple[int, bool], list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        for config in (configs if rep % 2 == 0 else configs[::-1]):
            result = run_child(*config)
            table[config].append(result)
            print(f"repeat {rep}: threads {config[0]} {'busy' if config[1] else 'no spinner'}: "
                  f"{result['images_per_s']:.1f} images/s ({result['seconds']:.2f} s)", file=sys.stderr)
    text = section(table, args.repeats, os.cpu_count() or 0)
    print(text)
    if not args.no_write:
        results.write_section(SECTION_TITLE, text)
        print(f"wrote its section of {results.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
