"""Offline commands and torch CPU threads: ``eqm sample`` / ``eqm eval-digits`` at their defaults against
torch's default thread count (``--threads 0``: one per core) and against ``OMP_NUM_THREADS=1``.

Each run is a fresh ``eqm`` process, as a user types it, with ``OMP_NUM_THREADS`` removed from its
environment (except in the ``OMP_NUM_THREADS=1`` configuration). Configurations alternate run by run, so
drifts of a shared machine spread over all of them; figures are medians with their [min-max] range.
Measured: the whole command's wall time and, where the command prints it, its sampling time ("sampled N
in X s"). The default of the offline commands' ``--threads`` comes from this table.

Usage:
  python bench/bench_cli_threads.py [--repeats 3] [--commands sample-digits,sample-em] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # `python bench/bench_cli_threads.py` from anywhere

from bench import results         # noqa: E402

SECTION_TITLE = "## Offline commands: torch CPU threads"
COMMANDS = {
    "sample-digits": ["sample", "--checkpoint", "digits", "--labels", "0,1,2,3,4,5,6,7,8,9", "--images-out", "d.npy"],
    "sample-em": ["sample", "--checkpoint", "em-digits", "--n", "8", "--images-out", "em.npy"],
    "eval-quick": ["eval-digits", "--quick", "--no-write"],
}
# name -> (extra flags, environment additions)
CONFIGS = {"default": ([], {}), "--threads 0": (["--threads", "0"], {}), "OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"})}
SAMPLED = re.compile(r"sampled \d+ in ([0-9.]+)s")


def run_once(command: list[str], flags: list[str], env_extra: dict[str, str], cwd: str) -> tuple[float, float | None]:
    """Wall seconds of one ``eqm`` process, and its sampling seconds where it prints them."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "service.cli", *command, *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"eqm {' '.join(command + flags)} failed:\n{proc.stderr[-2000:]}")
    found = SAMPLED.search(proc.stderr)
    return wall, float(found.group(1)) if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--commands", default="sample-digits,sample-em", help=f"comma-separated, of {', '.join(COMMANDS)}")
    p.add_argument("--no-write", action="store_true", help="print the section without touching bench/RESULTS.md")
    args = p.parse_args(argv)
    names = args.commands.split(",")
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        p.error(f"--commands: unknown {unknown}; known: {', '.join(COMMANDS)}")
    load = results.machine_load()
    walls = {(n, c): [] for n in names for c in CONFIGS}
    sampling = {(n, c): [] for n in names for c in CONFIGS}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.repeats):
            for name in names:
                for config, (flags, env_extra) in CONFIGS.items():
                    wall, sampled = run_once(COMMANDS[name], flags, env_extra, cwd)
                    walls[name, config].append(wall)
                    if sampled is not None:
                        sampling[name, config].append(sampled)
                    print(f"{name:14s} {config:18s} wall {wall:6.1f} s" +
                          (f", sampling {sampled:.1f} s" if sampled is not None else ""), file=sys.stderr)
    import torch
    lines = [SECTION_TITLE, "",
             f"{datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, Python {platform.python_version()}. {load}: a shared machine, so absolute "
             "figures move; the configurations alternated run by run and the ratios are taken within this run.",
             "", "Each figure: a fresh `eqm` process as a user types it (`python bench/bench_cli_threads.py "
             f"--repeats {args.repeats} --commands {args.commands}`), median [min-max] of {args.repeats}. *default*: "
             "the command as written (no `OMP_NUM_THREADS` in the environment; `--threads` left out); "
             "*--threads 0*: torch's default, one thread per core (what these commands did before they had "
             "`--threads`); *OMP_NUM_THREADS=1*: the default with one OpenMP thread forced from outside.", "",
             "| command | threads | whole command, s | sampling, s |", "|---|---|---|---|"]
    for name in names:
        shown = "eqm " + " ".join(a for a in COMMANDS[name] if not a.endswith(".npy") and a != "--images-out")
        for config in CONFIGS:
            sampled = results.median_range(sampling[name, config], "{:.1f}") if sampling[name, config] else "-"
            lines.append(f"| `{shown}` | {config} | {results.median_range(walls[name, config], '{:.1f}')} | {sampled} |")
    lines.append("")
    import statistics
    for name in names:
        for key, series in (("whole command", walls), ("sampling", sampling)):
            if not series[name, "default"]:
                continue
            default = statistics.median(series[name, "default"])
            lines.append(f"`{name}` ({key}): default {statistics.median(series[name, '--threads 0']) / default:.1f}x "
                         f"faster than torch's one-thread-per-core; default / OMP_NUM_THREADS=1 = "
                         f"{default / statistics.median(series[name, 'OMP_NUM_THREADS=1']):.2f} (1.0 = as fast).")
            lines.append("")
    lines.append("Default chosen: one thread on a CPU for a small model (a checkpoint under 64 MB, as the bundled ones), "
                 "the rule of the CPU worker (\"CPU worker threads\"); a larger model or a set `OMP_NUM_THREADS` "
                 "keeps torch's count, and `--threads N` overrides either.")
    results.publish(SECTION_TITLE, "\n".join(lines), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
