"""Continuous batching with packed rows against two baselines, on one mixed workload, side by side, in process.

Three modes of the same ``Engine``/``ModelRunner`` (same model, capacity, fused step, decode and PNG encoding):

- ``packed``: continuous batching with packed rows (the engine as shipped): finished samples leave the
  forward at once (the highest rows move into their holes) and waiting ones take their slots every step;
  the forward runs on the smallest bucket >= the rows in use (1, 2, 4, 8, then every 8).
- ``unpacked``: continuous batching as it was before packing: rows stay where they were admitted, the
  forward covers the highest row in use (finished rows below it are still computed), power-of-two buckets.
- ``static``: the fair static baseline: a batch is admitted only into an empty engine and runs until its
  last sample stops, but it uses the same packed rows, so finished rows stop costing anything at once.
  Its only handicap is the one that defines static batching: nothing joins a running batch.

Workloads (seeded): generation with guidance (2 rows per image), composition of two labels (2 or 3 rows),
denoising of a partially noised digit (1 row); step caps from 10 to 200 and gradient-norm thresholds from
0 (off) up, so samples stop at very different steps. ``t=0``: every job submitted at once. ``poisson``:
jobs arrive as a Poisson process at a fraction (the load) of the packed engine's measured t=0 job rate.
Latency is from a job's arrival to its last image.

Reported per mode: images/s, p50/p95 latency, rows evaluated per NFE (forward rows including padding
and finished rows, over the rows of running samples), engine steps; medians of ``--repeats`` runs in
alternating order with their range, and ratios taken within each round (side by side) then the median.
All modes must produce the same images: step counts equal, latents within 1e-5.

Usage:
  python bench/bench_engine.py [--jobs 60] [--capacity 32] [--repeats 3] [--loads 0.5,0.8,1.0] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # `python bench/bench_engine.py` from anywhere

from models import resolve_checkpoint                               # noqa: E402
from models import load_model                                       # noqa: E402
from models.codecs import make_codec                                # noqa: E402
from models.sampler import default_row_buckets                      # noqa: E402
from service.engine import Engine                                   # noqa: E402
from service.images import encode_image                             # noqa: E402
from service.jobstore import ImageSpec, JobSpec, SamplerSpec            # noqa: E402
from service.metrics import Metrics                                 # noqa: E402
from service.runner import COMPILE_MODES, ModelRunner               # noqa: E402
from service.scheduler import Scheduler                             # noqa: E402
from bench import results                                          # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION_TITLE = "## Engine: packed continuous vs fair static vs unpacked continuous batching"


def title_for(compile_mode: str) -> str:
    """Eager and compiled forwards are two reports, each with its own section."""
    return SECTION_TITLE if compile_mode == "off" else f"{SECTION_TITLE}, compiled forward ({compile_mode})"


MODES = ("static", "unpacked", "packed")
MODE_NAMES = {"static": "fair static", "unpacked": "unpacked continuous (former)", "packed": "packed continuous"}


def pow2_buckets(max_rows: int) -> list[int]:
    buckets, b = [], 1
    while b < max_rows:
        buckets.append(b)
        b *= 2
    return buckets + [max_rows]


def load(checkpoint: str, device: str):
    """The checkpoint if it exists, else the digits architecture with random weights (timing only)."""
    path = resolve_checkpoint(checkpoint)
    if path.exists():
        loaded = load_model(path, device=device)
        return loaded.model, loaded.spec, f"{checkpoint} ({path.name})"
    from models.eqm.checkpoint import ModelSpec
    from models.eqm.digits import digits_config
    from models.eqm.network import EqM
    torch.manual_seed(0)
    model = EqM(digits_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(device).eval().requires_grad_(False)
    return model, ModelSpec(model.config, guidance_mode="all", codec="identity"), \
        "digits architecture, random weights (no trained checkpoint found)"


def workload(n_jobs: int, seed: int, num_classes: int, image_size: int, channels: int) -> list[tuple[JobSpec, bytes | None]]:
    rng = random.Random(seed)
    upload = encode_image(np.asarray(np.random.default_rng(seed).integers(0, 256, (image_size, image_size, channels)),
                                     dtype=np.uint8))
    jobs = []
    for j in range(n_jobs):
        kind = rng.choices(["generate", "compose", "denoise"], weights=[5, 3, 2])[0]
        threshold = rng.choice([0.0, 0.0, 0.3, 1.0, 2.0])
        seeds = [1000 * j + i for i in range(rng.choice([1, 1, 2, 4, 8]))]
        if kind == "generate":
            images = [ImageSpec(seed=s, labels=[rng.randrange(num_classes)]) for s in seeds]
            spec = JobSpec(kind=kind, model="bench", images=images, cfg_scale=1.5,
                           sampler=SamplerSpec(step_size=0.03, mu=0.3, max_steps=rng.choice([20, 40, 60, 120, 200]),
                                               grad_norm_threshold=threshold))
        elif kind == "compose":
            images = [ImageSpec(seed=s, labels=rng.sample(range(num_classes), 2)) for s in seeds]
            spec = JobSpec(kind=kind, model="bench", images=images, cfg_scale=rng.choice([1.0, 1.5]),
                           sampler=SamplerSpec(step_size=0.03, mu=0.3, max_steps=rng.choice([40, 80, 150]),
                                               grad_norm_threshold=threshold))
        else:
            spec = JobSpec(kind=kind, model="bench", images=[ImageSpec(seed=s) for s in seeds],
                           noise_level=rng.choice([0.3, 0.5, 0.7]),
                           sampler=SamplerSpec(step_size=0.03, mu=0.3, max_steps=rng.choice([10, 30, 60]),
                                               grad_norm_threshold=threshold))
        jobs.append((spec, upload if kind == "denoise" else None))
    return jobs


def arrivals(n_jobs: int, rate: float | None, seed: int) -> list[float]:
    """Arrival times: all 0 (rate None), else a Poisson process of ``rate`` jobs/s."""
    if rate is None:
        return [0.0] * n_jobs
    rng = random.Random(seed + 17)
    t, out = 0.0, []
    for _ in range(n_jobs):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def run(mode: str, model, spec, jobs, times: list[float], capacity: int, rows: int, device: str,
        compile_mode: str = "off") -> dict:
    codec = make_codec(spec.codec, channels=model.config.in_channels, latent_size=model.config.input_size,
                       device=device)
    packed = mode != "unpacked"
    runner = ModelRunner(model, codec=codec, null_label=model.config.null_label,
                         guided_channels=spec.guided_channels, capacity=capacity, max_rows=rows, packed=packed,
                         row_buckets=None if packed else pow2_buckets(rows), compile_mode=compile_mode)
    runner.warmup()
    engine = Engine(runner, Scheduler(capacity, rows, static=(mode == "static")), model_name="bench",
                    metrics=Metrics())
    order = sorted(range(len(jobs)), key=lambda i: times[i])
    latencies, latents, steps_taken, early = [], {}, {}, 0
    n_steps = nfe = evaluated = 0
    row_counts = []                      # rows of running samples at each step
    t0, c0 = time.time(), time.process_time()
    while order or engine.has_work:
        now = time.time() - t0
        while order and times[order[0]] <= now:
            i = order.pop(0)
            job, upload = jobs[i]
            engine.add_job(JobSpec(**{**job.__dict__, "submitted": t0 + times[i]}), upload)
        if not engine.has_work:
            time.sleep(max(0.0, times[order[0]] - (time.time() - t0)))
            continue
        out = engine.step()
        n_steps += 1
        nfe += out.rows
        evaluated += out.bucket_rows
        row_counts.append(out.rows)
        latencies += [j.latency_s for j in out.jobs]
        for img in out.images:
            latents[(img.job_id, img.result.index)] = img.latent
            steps_taken[(img.job_id, img.result.index)] = img.result.steps
            early += img.result.stopped_early
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    n_images = len(latents)
    return {"mode": mode, "seconds": seconds, "images": n_images, "images_per_s": n_images / seconds,
            "cpu_seconds": cpu_seconds, "images_per_cpu_s": n_images / cpu_seconds,
            "latency_p50": float(np.percentile(latencies, 50)), "latency_p95": float(np.percentile(latencies, 95)),
            "rows_per_nfe": evaluated / nfe, "rows_evaluated": evaluated, "nfe": nfe, "engine_steps": n_steps,
            "mean_steps": statistics.fmean(steps_taken.values()), "stopped_early": early / n_images,
            "latents": latents, "steps": steps_taken, "row_counts": row_counts}


def check_same_images(runs: list[dict], exact: bool = True) -> float:
    """Batch invariance across modes; returns the largest latent difference.

    ``exact`` (the CPU in float32): identical step counts and latents equal to float rounding, else exit.
    On a GPU a forward's rounding depends on its batch size (TF32 / bf16 matmul tiling), so modes whose
    forward batches differ cannot agree to 1e-5, and a sample near its threshold may stop a step apart:
    there the difference and the samples that stopped at other steps are reported, not fatal.
    """
    ref = runs[0]
    worst = 0.0
    for r in runs[1:]:
        if r["steps"] != ref["steps"]:
            differ = sum(ref["steps"][k] != r["steps"].get(k) for k in ref["steps"])
            if exact:
                raise SystemExit(f"{r['mode']} and {ref['mode']} stopped {differ} samples at different steps")
            print(f"{r['mode']} and {ref['mode']} stopped {differ} of {len(ref['steps'])} samples at different "
                  "steps (batch-size-dependent GPU rounding)", file=sys.stderr)
        worst = max(worst, max(float((ref["latents"][k] - r["latents"][k]).abs().max()) for k in ref["latents"]))
    if exact and worst > 1e-5:
        raise SystemExit(f"latents differ by {worst:.1e} between modes: results depend on the batch")
    return worst


def rounds(name: str, cfg: dict, model, spec, jobs, times, log) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(cfg["repeats"]):
        order = MODES[i % 3:] + MODES[:i % 3]          # rotate: each mode goes first, middle and last
        for mode in order:
            r = run(mode, model, spec, jobs, times, cfg["capacity"], cfg["rows"], cfg["device"], cfg["compile"])
            runs[mode].append(r)
            log(f"{name} round {i + 1} {mode:>9}: {r['images_per_s']:.2f} images/s, p95 {r['latency_p95']:.2f}s, "
                f"rows/NFE {r['rows_per_nfe']:.3f}, {r['engine_steps']} steps")
    return runs


def table(runs: dict[str, list[dict]]) -> list[str]:
    rows = [("images/s", "images_per_s", "{:.2f}"), ("images per CPU-second", "images_per_cpu_s", "{:.2f}"),
            ("p50 latency (s)", "latency_p50", "{:.2f}"),
            ("p95 latency (s)", "latency_p95", "{:.2f}"), ("rows evaluated / NFE", "rows_per_nfe", "{:.3f}"),
            ("rows evaluated", "rows_evaluated", "{:.0f}"), ("NFE (rows of running samples)", "nfe", "{:.0f}"),
            ("engine steps", "engine_steps", "{:.0f}"), ("wall time (s)", "seconds", "{:.1f}"),
            ("CPU time (s)", "cpu_seconds", "{:.1f}")]
    lines = ["| median [range] | " + " | ".join(MODE_NAMES[m] for m in MODES) + " |",
             "|---|" + "---:|" * len(MODES)]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(results.median_range([r[key] for r in runs[m]], fmt) for m in MODES) + " |")
    return lines


def ratio(runs, key, a, b, invert=False) -> str:
    """Median [range] over rounds of a/b (b/a with invert), each round's pair measured side by side."""
    vals = [(y[key] / x[key]) if invert else (x[key] / y[key]) for x, y in zip(runs[a], runs[b])]
    return results.median_range(vals, "{:.2f}") + "x"


def section(cfg: dict, t0runs: dict, poisson: list[tuple[float, float, dict]], max_diff: float) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    p = t0runs["packed"][0]
    forward = ("eager forward (`EQM_COMPILE=off`, the default)" if cfg["compile"] == "off" else
               f"forward through `EQM_COMPILE={cfg['compile']}` in every mode: one static graph per bucket, "
               f"all built by the warm-up before timing")
    lines = [title_for(cfg["compile"]), "",
             f"{stamp}, {cfg['device_name']}, torch {torch.__version__}, {cfg['threads']} CPU thread(s); {cfg['load']}: "
             f"compare the modes within a round, and per CPU-second (this process's CPU time, one compute thread: what the work "
             f"cost, whatever else ran beside it). `python bench/bench_engine.py {shlex.join(cfg['argv'])}`", "",
             f"Model: {cfg['model']}; {forward}. Engine: capacity {cfg['capacity']} samples / {cfg['rows']} rows. Workload: "
             f"{cfg['jobs']} jobs ({cfg['mix']}), {p['images']} images; step caps 10-200, gradient-norm thresholds "
             f"0-2 ({p['stopped_early']:.0%} of the images stopped below their threshold), mean "
             f"{p['mean_steps']:.0f} updates per image. Each table: median [min-max] of {cfg['repeats']} rounds; "
             f"in each round every mode runs once, the order rotating between rounds.", "",
             "Modes (same engine, fused step, decode and encoding; only batching differs):", "",
             "- **packed continuous** (shipped): every step finished samples leave and waiting ones join; active "
             "rows stay packed in `[0, n)` and the forward runs on the smallest bucket >= n "
             f"(buckets {default_row_buckets(cfg['rows'])}).",
             "- **fair static**: the same packed rows (finished rows stop costing at once), but a batch is "
             "admitted only into an empty engine and nothing joins it until its last sample stops.",
             "- **unpacked continuous (former)**: continuous admission, but rows stay where they were admitted and "
             f"the forward covers the highest row in use, power-of-two buckets ({pow2_buckets(cfg['rows'])}).",
             "", "### All jobs at t = 0", ""]
    lines += table(t0runs)
    lines += ["",
              f"Packed continuous / fair static: images/s {ratio(t0runs, 'images_per_s', 'packed', 'static')} "
              f"(per CPU-second {ratio(t0runs, 'images_per_cpu_s', 'packed', 'static')}), "
              f"p95 latency {ratio(t0runs, 'latency_p95', 'packed', 'static', invert=True)} lower. "
              f"Packed / unpacked continuous: images/s {ratio(t0runs, 'images_per_s', 'packed', 'unpacked')} "
              f"(per CPU-second {ratio(t0runs, 'images_per_cpu_s', 'packed', 'unpacked')}), "
              f"rows evaluated {ratio(t0runs, 'rows_evaluated', 'packed', 'unpacked', invert=True)} fewer. "
              + (f"Every mode gave every sample the same number of updates and latents equal to within "
               f"{max_diff:.1e}." if not cfg["device"].startswith("cuda") else
               f"Latents of the modes differ by at most {max_diff:.1e} (on a GPU a forward's rounding depends "
               f"on its batch size, so modes agree to rounding, not bit for bit)."), ""]
    for load, rate, runs in poisson:
        lines += [f"### Poisson arrivals, load {load:.0%} ({rate:.2f} jobs/s)", ""]
        lines += table(runs)
        lines += ["", f"p95 latency, fair static / packed continuous: "
                      f"{ratio(runs, 'latency_p95', 'packed', 'static', invert=True)}; p50: "
                      f"{ratio(runs, 'latency_p50', 'packed', 'static', invert=True)}.", ""]
    lines += ["How to read it: where CPU time is well under wall time, this process waited for a core (other work "
              "on the machine), and the per-CPU-second row and the work counts (rows evaluated, steps) are the "
              "stable ones. On a CPU a forward costs nearly in proportion "
              "to its rows, so packing pays as rows saved and batching as the per-step overhead saved (fewer, "
              "fuller steps); on a GPU a forward of a few rows costs about as much as a full one, so the fewer "
              "steps of continuous batching weigh far more there. The eager and the compiled forward each have "
              "their own section.", "",
              (f"Load = arrival rate / the packed engine's job rate measured at t = 0 in this run "
               f"({cfg['job_rate']:.2f} jobs/s). " if poisson else "") +
              "Rows evaluated / NFE: 1.0 means every forward row belonged to "
              "a running sample; padding to a bucket and rows of finished samples are the excess.", ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace this report's section of RESULTS.md (or append it), leaving every other section as it is."""
    results.write_section(text.split("\n", 1)[0], text, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="digits", help="bundled name or file (default: digits)")
    p.add_argument("--jobs", type=int, default=60)
    p.add_argument("--capacity", type=int, default=32, help="sample slots (rows = 3 x capacity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every mode once, order rotating")
    p.add_argument("--loads", default="0.5,0.8,1.0", help="Poisson loads (fractions of the t=0 job rate); '' = none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared machine)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="the forward per bucket: eager (off), torch.compile, or CUDA graphs (the service's EQM_COMPILE)")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not touch {RESULTS.name}")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    try:
        loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--loads must be comma-separated numbers, got {args.loads!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, spec, model_desc = load(args.checkpoint, args.device)
    cfg = model.config
    channels = cfg.in_channels if spec.codec == "identity" else 3
    jobs = workload(args.jobs, args.seed, cfg.num_classes, cfg.input_size, channels)
    mix = ", ".join(f"{sum(j.kind == k for j, _ in jobs)} {k}" for k in ("generate", "compose", "denoise"))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    conf = {"device_name": device_name, "load": results.machine_load(), "threads": torch.get_num_threads(), "model": model_desc,
            "capacity": args.capacity, "rows": 3 * args.capacity, "jobs": args.jobs, "mix": mix,
            "repeats": args.repeats, "device": args.device, "compile": args.compile, "argv": argv if argv is not None else sys.argv[1:]}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)      # noqa: E731
    t0runs = rounds("t=0", conf, model, spec, jobs, arrivals(len(jobs), None, args.seed), log)
    exact = not args.device.startswith("cuda")      # see check_same_images
    max_diff = check_same_images([r for m in MODES for r in t0runs[m]], exact)
    conf["job_rate"] = statistics.median(len(jobs) / r["seconds"] for r in t0runs["packed"])
    poisson = []
    for level in loads:
        rate = level * conf["job_rate"]
        runs = rounds(f"load {level:.0%}", conf, model, spec, jobs, arrivals(len(jobs), rate, args.seed), log)
        max_diff = max(max_diff, check_same_images([r for m in MODES for r in runs[m]], exact))
        poisson.append((level, rate, runs))
    text = section(conf, t0runs, poisson, max_diff)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote its section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
