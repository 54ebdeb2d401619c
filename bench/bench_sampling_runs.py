"""Sampling runs of the bundled digits model, end to end, four measurements (each can run alone: ``--only``;
figures are kept in ``bench/sampling_runs.json`` and the section of RESULTS.md is rebuilt from all of them):

- ``identity``: ``eqm serve`` + ``eqm sample --server URL --num-samples N --npz`` against ``eqm sample
  --num-samples N --npz`` offline (same seeds, the model's recorded settings): images that differ, labels,
  wall time of each, the run's report (the quality judge's figures where this build has it).
- ``chaos``: ``eqm api`` + two CPU worker processes, ``kill -9`` of one of them every ``--kill-every`` seconds
  for the whole run (restarted at once); images missing, duplicated and different from the offline run.
- ``latency``: single-image ``/v1/images/generations`` requests, one after another, on an idle ``eqm serve``
  (baseline) and while a sampling run keeps the same worker busy; p50/p95 per round (idle, then busy).
- ``throughput``: images/s of a run through the service (one worker) against the engine alone on the same
  worker settings (``service.worker.build_engine``: capacity 64, one torch thread, PNG encoding as the worker
  does) on the run's own shard jobs, right after the service's run in each round; medians [min-max].

Usage: python bench/bench_sampling_runs.py [--only identity,chaos,latency,throughput] [--samples 10000] ...
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import machine_load, median_range, publish  # noqa: E402
from service.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from service.sampling_client import SamplingRunClient  # noqa: E402

TITLE = "## Sampling runs: ADM .npz through the service, kill -9, interactive latency, throughput"
FIGURES = Path(__file__).resolve().parent / "sampling_runs.json"
WORK = Path(tempfile.gettempdir()) / "eqm-bench-sampling-runs"


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    out.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", EQM_CHECKPOINT="digits", EQM_HEARTBEAT_S="0.5", **extra)
    return out


def eqm(*args: str, environ: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=environ or env(), stdout=out,
                            stderr=subprocess.STDOUT)


def wait_ready(url: str, timeout_s: float = 180) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready within {timeout_s}s")


class Serve:
    """``eqm serve`` (embedded Redis, one CPU worker) with its own results store."""

    def __init__(self, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.results = WORK / name
        self.log = WORK / f"{name}.log"

    def __enter__(self):
        WORK.mkdir(parents=True, exist_ok=True)
        self.proc = eqm("serve", "--port", str(self.port), "--device", "cpu", "--threads", "1", "--log-level",
                        "warning", environ=env(EQM_RESULTS_DIR=str(self.results)), log=self.log)
        wait_ready(self.url)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def offline_reference(n: int) -> tuple[Path, float]:
    out = WORK / f"offline-{n}.npz"
    if not out.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "service.cli", "sample", "--checkpoint", "digits", "--num-samples",
                        str(n), "--npz", str(out), "--device", "cpu"], cwd=ROOT, env=env(), check=True)
        (WORK / f"offline-{n}.seconds").write_text(str(time.perf_counter() - t0))
    return out, float((WORK / f"offline-{n}.seconds").read_text())


def compare(got: Path, want: Path) -> dict:
    with np.load(got) as a, np.load(want) as b:
        x, y = a["arr_0"], b["arr_0"]
        differ = int((x != y).any(axis=(1, 2, 3)).sum()) if x.shape == y.shape else -1
        flat = {bytes(img) for img in x.reshape(len(x), -1)}
        return {"images": int(len(x)), "shape": list(x.shape), "labels_equal": bool(np.array_equal(a["arr_1"], b["arr_1"])),
                "images_differing": differ, "max_pixel_diff": int(np.abs(x.astype(int) - y).max()) if differ >= 0 else -1,
                "distinct_images": len(flat), "distinct_offline": len({bytes(i) for i in y.reshape(len(y), -1)})}


def identity(args) -> dict:
    ref, offline_s = offline_reference(args.samples)
    with Serve("identity") as s:
        out = WORK / "identity.npz"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "service.cli", "sample", "--server", s.url, "--num-samples",
                        str(args.samples), "--npz", str(out)], cwd=ROOT, env=env(), check=True)
        served_s = time.perf_counter() - t0
        run_id = next((s.results / "runs").iterdir()).name
        report = httpx.get(f"{s.url}/v1/sampling-runs/{run_id}").json()
    return {"samples": args.samples, "offline_s": offline_s, "served_s": served_s, **compare(out, ref),
            "progress": report["progress"], "judge": (report["report"] or {}).get("judge")}


def chaos(args) -> dict:
    """Two worker processes that this script restarts at once when killed (an orchestrator without back-off:
    ``eqm worker``'s supervisor backs off up to 30 s for workers that die young, and a worker killed every few
    seconds is always young); every ``--kill-every`` s one of them that has been up that long gets ``kill -9``."""
    ref, _ = offline_reference(args.samples)
    redis_server = EmbeddedRedis().start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    e = env(EQM_REDIS_URL=redis_server.url, EQM_RESULTS_DIR=str(WORK / "chaos"), EQM_CLAIM_IDLE_MS="2000")
    log = WORK / "chaos.log"

    def worker(k: int) -> subprocess.Popen:
        out = open(log, "ab")
        return subprocess.Popen([sys.executable, "-m", "service.worker", "--device", "cpu", "--threads", "1",
                                 "--name", f"chaos-{k}-{time.monotonic_ns()}"], cwd=ROOT, env=e, stdout=out,
                                stderr=subprocess.STDOUT)

    workers = [worker(0), worker(1)]
    born = [time.monotonic()] * 2
    api = eqm("api", "--port", str(port), "--log-level", "warning", environ=e, log=log)
    kills = 0
    try:
        wait_ready(url)
        client = SamplingRunClient(url)
        t0 = time.perf_counter()
        run = client.submit(num_samples=args.samples)
        while client.status(run["id"])["status"] == "running":
            time.sleep(args.kill_every)
            old = [k for k in (0, 1) if time.monotonic() - born[k] >= args.kill_every]
            if old:
                k = random.choice(old)
                workers[k].kill()
                workers[k].wait()
                kills += 1
                workers[k], born[k] = worker(k), time.monotonic()
        seconds = time.perf_counter() - t0
        final = client.status(run["id"])
        out = WORK / "chaos.npz"
        client.download(run["id"], out)
    finally:
        for proc in (api, *workers):
            proc.kill()
            proc.wait()
        redis_server.stop()
    return {"samples": args.samples, "kills": kills, "seconds": seconds, "status": final["status"],
            "shards_failed": final["progress"]["shards_failed"], "shards_lost": final["progress"]["shards_lost"],
            "nfe": final["progress"]["nfe"], **compare(out, ref)}


def _single_requests(url: str, count: int) -> list[float]:
    out = []
    with httpx.Client(timeout=120) as http:
        for k in range(count):
            t0 = time.perf_counter()
            resp = http.post(f"{url}/v1/images/generations", json={"prompt": str(k % 10), "seed": 10_000 + k})
            resp.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def latency(args) -> dict:
    rounds = []
    with Serve("latency") as s:
        _single_requests(s.url, 5)                                     # warm
        client = SamplingRunClient(s.url)
        for r in range(args.repeats):
            idle = _single_requests(s.url, args.requests)
            run = client.submit(num_samples=args.latency_run_samples, seed=r * 100_000)
            while client.status(run["id"])["progress"]["done"] == 0:
                time.sleep(0.2)
            busy = _single_requests(s.url, args.requests)
            still = client.status(run["id"])["status"] == "running"
            client.http.post(f"/v1/sampling-runs/{run['id']}/cancel")
            time.sleep(2)
            rounds.append({"idle_p50": float(np.percentile(idle, 50)), "idle_p95": float(np.percentile(idle, 95)),
                           "busy_p50": float(np.percentile(busy, 50)), "busy_p95": float(np.percentile(busy, 95)),
                           "run_still_running_at_end": still})
    return {"requests": args.requests, "rounds": rounds}


def _engine_alone(specs) -> float:
    from service.metrics import Metrics
    from service.worker import WorkerConfig, build_engine
    engine = build_engine(WorkerConfig(redis_url="", device="cpu", threads=1), Metrics())
    t0 = time.perf_counter()
    for spec in specs:
        engine.add_job(spec)
    pending, n = [], 0
    while engine.has_work:
        out = engine.step()
        pending += [img.data for img in out.images if isinstance(img.data, Future)]
        n += len(out.images)
    for f in pending:
        f.result()
    seconds = time.perf_counter() - t0
    engine.encode_pool.shutdown()
    return n / seconds


def throughput(args) -> dict:
    from service.runs.plan import shard_job
    rounds = []
    with Serve("throughput") as s:
        client = SamplingRunClient(s.url)
        for r in range(args.repeats):
            run = client.submit(num_samples=args.throughput_samples, seed=r * 100_000)
            run = client.wait(run["id"])
            service_rate = args.throughput_samples / (run["finished"] - run["created"])
            record = json.loads((s.results / "runs" / run["id"] / "run.json").read_text())
            engine_rate = _engine_alone([shard_job(record, shard) for shard in record["shards"]])
            rounds.append({"service_images_per_s": service_rate, "engine_images_per_s": engine_rate,
                           "ratio": service_rate / engine_rate})
    return {"samples": args.throughput_samples, "rounds": rounds}


def render(fig: dict) -> str:
    lines = [TITLE, "", f"`python bench/bench_sampling_runs.py` — {fig.get('date', '?')}, 2-core CPU (x86_64), "
             "loaded: shared with four other engineers' builds and tests (each part's load below). Bundled digits "
             "model, its recorded sampler settings, one torch thread per worker.", ""]
    if "identity" in fig:
        i = fig["identity"]
        lines += [f"**Identity** (`eqm serve` + `eqm sample --server --num-samples {i['samples']} --npz`; baseline: "
                  f"`eqm sample --num-samples {i['samples']} --npz` offline, same seeds and settings): arr_0 "
                  f"{tuple(i['shape'])} uint8, labels equal: {i['labels_equal']}, images differing: "
                  f"{i['images_differing']} (largest pixel difference {i['max_pixel_diff']}); wall time "
                  f"{i['served_s']:.0f} s through the service (one CPU worker) vs {i['offline_s']:.0f} s offline "
                  f"(one batch); NFE {i['progress']['nfe']}. Judge in the run's report: {i['judge']}. "
                  f"Load: {i.get('load', '?')}.", ""]
    if "chaos" in fig:
        c = fig["chaos"]
        missing = c["samples"] - c["images"]
        lines += [f"**Chaos** (two CPU worker processes, `kill -9` of one every few seconds and restarted at once, "
                  f"{c['kills']} kills over "
                  f"{c['seconds']:.0f} s): status {c['status']}, {max(0, missing)} images missing, "
                  f"{c['distinct_offline'] - c['distinct_images']} duplicated (distinct images {c['distinct_images']} "
                  f"vs {c['distinct_offline']} offline), {c['images_differing']} differing from the offline run; "
                  f"shard failures {c['shards_failed']}, shards dead-lettered and run again {c.get('shards_lost', 0)}; "
                  f"default settings (3 deliveries per job, reclaim after 2 s idle). Load: {c.get('load', '?')}.", ""]
    if "latency" in fig:
        rs = fig["latency"]["rounds"]
        lines += [f"**Interactive latency** ({fig['latency'].get('load', '?')}; {fig['latency']['requests']} single-image `/v1/images/generations`, one "
                  "at a time; baseline: the same requests on the idle service just before, in each round):", "",
                  "| | p50 (s) | p95 (s) |", "|---|---|---|",
                  f"| during a run | {median_range([r['busy_p50'] for r in rs], '{:.3f}')} | "
                  f"{median_range([r['busy_p95'] for r in rs], '{:.3f}')} |",
                  f"| idle service (baseline) | {median_range([r['idle_p50'] for r in rs], '{:.3f}')} | "
                  f"{median_range([r['idle_p95'] for r in rs], '{:.3f}')} |", "",
                  f"p95 ratio during/idle: {median_range([r['busy_p95'] / r['idle_p95'] for r in rs], '{:.2f}')}: not "
                  "within 1.5x. The request is read at once (a run keeps two shards per live worker queued, so the "
                  "stream holds nothing of the run in front of it) and admitted first (shards have priority -1); what "
                  "is left is the step cost: on a CPU a forward costs in proportion to its rows, and the interactive "
                  "sample steps beside up to 64 run samples (128 rows with guidance), about 0.1 s a step instead of a "
                  "few ms idle, for its 20-60 steps. Closing the gap needs preemption in the engine (running "
                  "lower-priority samples kept in their slots but left out of the forward while higher-priority ones "
                  "run), which is not built; a run's images/s then drops by the interactive share.", ""]
    if "throughput" in fig:
        rs = fig["throughput"]["rounds"]
        lines += [f"**Throughput** ({fig['throughput'].get('load', '?')}; {fig['throughput']['samples']} images per round; baseline: the engine alone, "
                  "built as the worker builds it, on the same shard jobs, run right after the service's run in each round):", "",
                  "| | images/s |", "|---|---|",
                  f"| sampling run through the service (one worker) | "
                  f"{median_range([r['service_images_per_s'] for r in rs], '{:.1f}')} |",
                  f"| engine alone (baseline) | {median_range([r['engine_images_per_s'] for r in rs], '{:.1f}')} |",
                  "", f"service / engine: {median_range([r['ratio'] for r in rs], '{:.2f}')}: not within 10% on "
                  "1,000 images. Not yet broken down; candidates are the worker's Redis round trips between steps "
                  "(progress events, previews, fetches) and a run's fixed costs (keeper passes every 0.5 s, the "
                  "last shard's tail, assembly and report, counted in the run's time).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="identity,chaos,latency,throughput")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--kill-every", type=float, default=4.0)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--latency-run-samples", type=int, default=3000)
    p.add_argument("--throughput-samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--render", action="store_true", help="only rebuild the RESULTS.md section from the kept figures")
    args = p.parse_args(argv)
    fig = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    if not args.render:
        fig.update(date=datetime.date.today().isoformat(), load=machine_load())
    for part in [] if args.render else args.only.split(","):
        load = machine_load()
        fig[part] = {"identity": identity, "chaos": chaos, "latency": latency, "throughput": throughput}[part](args)
        fig[part]["load"] = load
        if not args.no_write:
            FIGURES.write_text(json.dumps(fig, indent=1))
    publish(TITLE, render(fig), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
