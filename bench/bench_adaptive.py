"""Adaptive compute as time, and bf16 against fp32, on the bundled digits model.

Adaptive compute: for gradient-norm thresholds 0 (off), 0.5, 1 and 2, the same class-conditional
images (``--per-class`` per digit, the model's recommended NAG-GD setting: step 0.05, mu 0.3, 60
steps, CFG 1.5) are made twice:

- offline, by ``models.sampler.sample`` (what ``eqm sample`` runs): one packed batch, a sample
  leaves the forward as soon as it stops;
- in the worker engine (``service.engine.Engine``, capacity 32 samples / 96 rows), one job per
  digit, all submitted at t = 0.

For each: NFE (rows of running samples), rows the forward evaluated, wall time, and the share of
NFE and of wall time saved against threshold 0 measured in the same round; quality beside it =
the accuracy of an RBF SVM trained on the held-out-free train split (as in ``eval_digits.py``).
Rounds rotate the order of the thresholds; the tables give medians [min-max].

bf16 vs fp32: the same start noise and settings (threshold 0) with the model in bfloat16 and in
float32 (the iterate stays float32 both times): the fraction of images the classifier labels
identically, and the PSNR between the two images of each pair.

Usage:
  python bench/bench_adaptive.py [--per-class 10] [--repeats 3] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # `python bench/bench_adaptive.py` from anywhere

from models import resolve_checkpoint                                           # noqa: E402
from models import load_model                                                   # noqa: E402
from models.codecs import IdentityCodec                                         # noqa: E402
from models.eqm.digits import DIGITS_DEFAULTS, load_digits_split                    # noqa: E402
from models.sampler import Condition, SamplerParams, noise_for_seed, sample     # noqa: E402
from service.engine import Engine                                               # noqa: E402
from service.jobstore import ImageSpec, JobSpec, SamplerSpec                        # noqa: E402
from service.metrics import Metrics                                             # noqa: E402
from service.runner import ModelRunner                                          # noqa: E402
from service.scheduler import Scheduler                                         # noqa: E402
from bench import results                                                      # noqa: E402
from bench.eval_digits import _features, _psnr, train_classifier                # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION_TITLE = "## Adaptive compute as time; bf16 vs fp32 (digits)"
THRESHOLDS = (0.0, 0.5, 1.0, 2.0)
SEED = 5000


def params_for(threshold: float) -> SamplerParams:
    p = DIGITS_DEFAULTS.params
    return SamplerParams(sampler=p.sampler, step_size=p.step_size, mu=p.mu, max_steps=p.max_steps,
                         grad_norm_threshold=threshold)


def offline(model, labels: list[int], threshold: float, guided: int, dtype=None) -> dict:
    start = torch.stack([noise_for_seed(SEED + i, (1, 8, 8)) for i in range(len(labels))])
    conds = [Condition((y,), cfg_scale=DIGITS_DEFAULTS.cfg_scale) for y in labels]
    stats: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    got = sample(model, start, conds, params_for(threshold), null_label=model.config.null_label,
                 guided_channels=guided, dtype=dtype, stats=stats)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "nfe": stats["nfe"], "rows": stats["rows_evaluated"], "latents": got.latents,
            "mean_steps": statistics.fmean(got.steps)}


def engine_run(model, labels: list[int], threshold: float, guided: int, per_class: int) -> dict:
    runner = ModelRunner(model, codec=IdentityCodec(1, 8), null_label=model.config.null_label, guided_channels=guided,
                         capacity=32, max_rows=96)
    runner.warmup()
    engine = Engine(runner, Scheduler(32, 96), model_name="bench", metrics=Metrics())
    p = params_for(threshold)
    sampler = SamplerSpec(sampler=p.sampler, step_size=p.step_size, mu=p.mu, max_steps=p.max_steps,
                          grad_norm_threshold=threshold)
    order = {}
    for digit in range(10):
        images = [ImageSpec(seed=SEED + i, labels=[digit]) for i in range(len(labels)) if labels[i] == digit]
        job = JobSpec(kind="generate", model="bench", images=images, cfg_scale=DIGITS_DEFAULTS.cfg_scale,
                      sampler=sampler)
        order[job.id] = [i for i in range(len(labels)) if labels[i] == digit]
        engine.add_job(job)
    latents = torch.zeros(len(labels), 1, 8, 8)
    nfe = rows = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while engine.has_work:
        out = engine.step()
        nfe += out.rows
        rows += out.bucket_rows
        for img in out.images:
            latents[order[img.job_id][img.result.index]] = img.latent
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "nfe": nfe, "rows": rows, "latents": latents}



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.per_class < 1 or args.repeats < 1:
        p.error("--per-class and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    load = results.machine_load()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)      # noqa: E731
    split = load_digits_split()
    clf = train_classifier(split)
    loaded = load_model(resolve_checkpoint("digits"))
    model, guided = loaded.model, loaded.spec.guided_channels
    labels = [d for d in range(10) for _ in range(args.per_class)]
    y = np.asarray(labels)

    def accuracy(latents: torch.Tensor) -> float:
        return float((clf.predict(_features(latents)) == y).mean())

    runs = {(where, t): [] for where in ("offline", "engine") for t in THRESHOLDS}
    for r in range(args.repeats):
        order = THRESHOLDS[r % 4:] + THRESHOLDS[:r % 4]
        for t in order:
            for where in (("offline", "engine") if r % 2 == 0 else ("engine", "offline")):
                res = offline(model, labels, t, guided) if where == "offline" else \
                    engine_run(model, labels, t, guided, args.per_class)
                res["accuracy"] = accuracy(res["latents"])
                runs[(where, t)].append(res)
                log(f"round {r + 1} {where:>7} threshold {t}: {res['seconds']:.2f}s, NFE {res['nfe']}, "
                    f"rows {res['rows']}, accuracy {res['accuracy']:.1%}")

    # bf16 vs fp32 (offline, threshold 0): same noise, same settings.
    fp32 = offline(model, labels, 0.0, guided)
    bf16 = offline(loaded.model.to(torch.bfloat16), labels, 0.0, guided, dtype=torch.bfloat16)
    same_label = float((clf.predict(_features(fp32["latents"])) == clf.predict(_features(bf16["latents"]))).mean())
    psnr = _psnr(bf16["latents"], fp32["latents"])
    acc16, acc32 = accuracy(bf16["latents"]), accuracy(fp32["latents"])

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    argv_s = " ".join(["python bench/bench_adaptive.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [SECTION_TITLE, "",
             f"{stamp}, {device}, torch {torch.__version__}, {args.threads} CPU thread(s); {load}: "
             f"savings are taken within a round against threshold 0, in wall time "
             f"and in this process's CPU time (one compute thread). `{argv_s}`",
             "",
             f"{len(labels)} class-conditional digits ({args.per_class} per class), NAG-GD step 0.05, mu 0.3, at most "
             f"60 updates, CFG 1.5 (2 rows per image); the threshold stops an image once ||g|| falls below it. "
             f"Offline = `models.sampler.sample` (what `eqm sample` runs: one packed batch, finished images leave "
             f"the forward at once); engine = the worker engine, 32 samples / 96 rows, one job per digit at t = 0. "
             f"Medians [min-max] of {args.repeats} rounds; accuracy by an RBF SVM trained on the train split.", "",
             "| threshold | where | NFE saved | wall time saved | wall saved / NFE saved | CPU time saved "
             "| CPU saved / NFE saved | rows evaluated / NFE | wall time (s) | accuracy |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for where in ("offline", "engine"):
        base = runs[(where, 0.0)]
        for t in THRESHOLDS:
            cur = runs[(where, t)]
            nfe_saved = [1 - c["nfe"] / b["nfe"] for c, b in zip(cur, base)]
            time_saved = [1 - c["seconds"] / b["seconds"] for c, b in zip(cur, base)]
            cpu_saved = [1 - c["cpu"] / b["cpu"] for c, b in zip(cur, base)]
            per = [ts / ns for ts, ns in zip(time_saved, nfe_saved)] if t > 0 else None
            per_cpu = [ts / ns for ts, ns in zip(cpu_saved, nfe_saved)] if t > 0 else None
            lines.append(f"| {t:g} | {where} | {results.median_range(nfe_saved, '{:.0%}')} | {results.median_range(time_saved, '{:.0%}')} | "
                         f"{results.median_range(per, '{:.2f}') if per else '-'} | {results.median_range(cpu_saved, '{:.0%}')} | "
                         f"{results.median_range(per_cpu, '{:.2f}') if per_cpu else '-'} | {results.median_range([c['rows'] / c['nfe'] for c in cur], '{:.3f}')} | "
                         f"{results.median_range([c['seconds'] for c in cur], '{:.2f}')} | {results.median_range([c['accuracy'] for c in cur], '{:.1%}')} |")
    lines += ["",
              f"bf16 vs fp32 (offline, threshold 0, same noise; iterate float32 in both): the classifier gives the "
              f"same label to {same_label:.1%} of the {len(labels)} pairs; PSNR between the two images of a pair "
              f"{psnr:.1f} dB (images in [-1, 1], peak-to-peak 2); accuracy fp32 {acc32:.1%}, bf16 {acc16:.1%}. "
              f"(CPU bf16 is emulated and slow; on CUDA bf16 is the default for its tensor cores.)", ""]
    results.publish(SECTION_TITLE, "\n".join(lines), write=not args.no_write, path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
