"""The whole service against the engine alone, on one workload, side by side.

Service: an embedded redis-server, one worker process (``python -m service.worker``, the CPU, one torch
thread, capacity 32 samples / 96 rows) and the API (uvicorn, one process), all on loopback. A client
process submits every job of the workload at t = 0 over HTTP (generations, compositions and denoising
uploads, the mix of ``bench_engine.py``), then follows each job

- ``sse``: through its event stream (``/v1/jobs/{id}/events``) until the final event, or
- ``poll``: through its status (``GET /v1/jobs/{id}``) every 100 ms until it is final,

and downloads every image. Throughput = images / (first submission -> last image downloaded).

Engine alone: the same jobs (read back from Redis as the API stored them, so seeds, labels and settings
are identical) run through an in-process ``Engine`` with the same capacity, one torch thread, images
encoded as the worker does, from t = 0 until the last image is encoded: the service minus HTTP,
Redis, the worker's loop and the clients. Runs alternate (engine, sse, poll, rotating); medians [range].

Usage:
  python bench/bench_service.py [--jobs 60] [--repeats 3] [--no-write]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # `python bench/bench_service.py` from anywhere

import httpx                                                        # noqa: E402
import redis                                                        # noqa: E402
import torch                                                        # noqa: E402

from models import resolve_checkpoint                               # noqa: E402
from models import load_model                                       # noqa: E402
from models.codecs import make_codec                                # noqa: E402
from service.embedded_redis import EmbeddedRedis, free_port         # noqa: E402
from service.engine import Engine                                   # noqa: E402
from service.images import encode_image                             # noqa: E402
from service.jobstore import JobSpec, JobStore                          # noqa: E402
from service.metrics import Metrics                                 # noqa: E402
from service.runner import ModelRunner                              # noqa: E402
from service.scheduler import Scheduler                             # noqa: E402
from bench import results                                          # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION_TITLE = "## Service vs engine alone"
CAPACITY, ROWS = 32, 96
MODES = ("engine", "sse", "poll")
MODE_NAMES = {"engine": "engine alone", "sse": "service, event-stream clients", "poll": "service, polling clients"}


def requests_for(n_jobs: int, seed: int) -> list[tuple[str, dict]]:
    """(path, body) per job: the mix of bench_engine.py expressed as API requests."""
    rng = random.Random(seed)
    out = []
    for j in range(n_jobs):
        kind = rng.choices(["generate", "compose", "denoise"], weights=[5, 3, 2])[0]
        threshold = rng.choice([0.0, 0.0, 0.3, 1.0, 2.0])
        n = rng.choice([1, 1, 2, 4, 8])
        common = {"seed": 1000 * j, "sampler": "nag", "step_size": 0.03, "mu": 0.3, "grad_norm_threshold": threshold}
        if kind == "generate":
            out.append(("/v1/generations", {**common, "labels": [rng.randrange(10) for _ in range(n)], "n": 1,
                                            "guidance_scale": 1.5, "max_steps": rng.choice([20, 40, 60, 120, 200])}))
        elif kind == "compose":
            out.append(("/v1/compositions", {**common, "labels": rng.sample(range(10), 2), "n": n,
                                             "guidance_scale": rng.choice([1.0, 1.5]),
                                             "max_steps": rng.choice([40, 80, 150])}))
        else:
            out.append(("/v1/denoise", {**common, "n": n, "noise_level": rng.choice([0.3, 0.5, 0.7]),
                                        "max_steps": rng.choice([10, 30, 60])}))
    return out


class Stack:
    """Redis, one worker and the API as child processes; ``close`` stops what it started."""

    def __init__(self, logdir: Path):
        self.redis = EmbeddedRedis().start()
        self.url = self.redis.url
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", EQM_REDIS_URL=self.url, EQM_CHECKPOINT="digits",
                   EQM_MAX_QUEUE="100000", EQM_CAPACITY=str(CAPACITY))
        self.api = f"http://127.0.0.1:{self.port}"
        self._spawn([sys.executable, "-m", "service.worker", "--device", "cpu", "--threads", "1",
                     "--capacity", str(CAPACITY), "--max-rows", str(ROWS), "--parent-pid", str(os.getpid())],
                    env, logdir / "worker.log")
        self._spawn([sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory", "--host", "127.0.0.1",
                     "--port", str(self.port), "--log-level", "warning", "--timeout-keep-alive", "30"],
                    env, logdir / "api.log")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        self.close()
        raise SystemExit(f"the service did not become ready; logs in {logdir}")

    def _spawn(self, argv, env, log: Path) -> None:
        with open(log, "wb") as fh:
            self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the worker, the API and Redis (utime + stime from /proc)."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, proc in (("worker", self.procs[0]), ("api", self.procs[1]), ("redis", self.redis.proc)):
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / ticks
            except (OSError, IndexError, ValueError):
                out[name] = float("nan")
        return out

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()


async def drive(api: str, reqs: list[tuple[str, dict]], upload: bytes, mode: str) -> dict:
    """Submit every request at t = 0, follow each job (SSE or polling), download its images."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=api, timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def get(url: str) -> httpx.Response:
            # A GET is safe to repeat: a keep-alive connection the server just closed is retried once or twice.
            for attempt in range(3):
                try:
                    return await client.get(url)
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        async def one(path: str, body: dict) -> tuple[str, int, float]:
            if path == "/v1/denoise":
                form = {k: str(v) for k, v in body.items()}
                resp = await client.post(path, data=form, files={"image": ("d.png", upload, "image/png")})
            else:
                resp = await client.post(path, json=body)
            resp.raise_for_status()
            job = resp.json()
            if mode == "sse":
                async with client.stream("GET", job["links"]["events"]) as stream:
                    event = None
                    async for line in stream.aiter_lines():
                        if line.startswith("event: "):
                            event = line[7:].strip()
                            if event in ("done", "failed", "cancelled"):
                                break
                    if event != "done":
                        raise RuntimeError(f"job {job['id']} ended {event}")
            else:
                while True:
                    status = (await get(job["links"]["self"])).json()
                    if status["status"] in ("done", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.1)
                if status["status"] != "done":
                    raise RuntimeError(f"job {job['id']} ended {status['status']}")
            for url in job["links"]["images"]:
                img = await get(url)
                img.raise_for_status()
            return job["id"], job["num_images"], time.perf_counter() - t0

        done = await asyncio.gather(*(one(p, b) for p, b in reqs))
        seconds = time.perf_counter() - t0
    n = sum(k for _, k, _ in done)
    lat = [t for _, _, t in done]
    return {"mode": mode, "seconds": seconds, "images": n, "images_per_s": n / seconds,
            "latency_p50": float(np.percentile(lat, 50)), "latency_p95": float(np.percentile(lat, 95)),
            "ids": [i for i, _, _ in done]}


def engine_alone(model, spec, specs: list[tuple[JobSpec, bytes | None]]) -> dict:
    codec = make_codec(spec.codec, channels=model.config.in_channels, latent_size=model.config.input_size)
    runner = ModelRunner(model, codec=codec, null_label=model.config.null_label, guided_channels=spec.guided_channels,
                         capacity=CAPACITY, max_rows=ROWS)
    runner.warmup()
    pool = ThreadPoolExecutor(max_workers=2)
    engine = Engine(runner, Scheduler(CAPACITY, ROWS), model_name="bench", metrics=Metrics(), encode_pool=pool)
    t0 = time.perf_counter()
    for job, upload in specs:
        engine.add_job(JobSpec(**{**job.__dict__, "submitted": time.time()}), upload)
    pending, latencies, n = [], [], 0
    c0 = time.process_time()
    while engine.has_work:
        out = engine.step()
        pending += [img.data for img in out.images if isinstance(img.data, Future)]
        n += len(out.images)
        latencies += [time.perf_counter() - t0 for _ in out.jobs]
    for f in pending:
        f.result()
    seconds = time.perf_counter() - t0
    cpu_total = time.process_time() - c0
    pool.shutdown()
    return {"mode": "engine", "seconds": seconds, "cpu_total": cpu_total, "images": n, "images_per_s": n / seconds,
            "latency_p50": float(np.percentile(latencies, 50)), "latency_p95": float(np.percentile(latencies, 95))}



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.repeats < 1:
        p.error("--jobs and --repeats must be >= 1")
    torch.set_num_threads(1)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)      # noqa: E731
    loaded = load_model(resolve_checkpoint("digits"))
    reqs = requests_for(args.jobs, args.seed)
    upload = encode_image(np.asarray(np.random.default_rng(args.seed).integers(0, 256, (8, 8, 1)), dtype=np.uint8))
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"eqm-bench-service-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(logdir)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        client = redis.Redis.from_url(stack.url)
        store = JobStore(client)
        specs = None
        load = results.machine_load()
        for r in range(args.repeats):
            order = MODES[r % 3:] + MODES[:r % 3]
            if specs is None and order[0] == "engine":
                order = order[1:] + order[:1]             # the jobs are read back from a service run first
            for mode in order:
                if mode == "engine":
                    res = engine_alone(loaded.model, loaded.spec, specs)
                else:
                    before, c0 = stack.cpu_seconds(), time.process_time()
                    res = asyncio.run(drive(stack.api, reqs, upload, mode))
                    after = stack.cpu_seconds()
                    res["cpu"] = {k: after[k] - before[k] for k in after}
                    res["cpu"]["clients"] = time.process_time() - c0
                    if specs is None:
                        specs = [(JobSpec.from_json(json.dumps(store.get(i)["spec"])),
                                  client.get(store.keys.input(i))) for i in res["ids"]]
                runs[mode].append(res)
                log(f"round {r + 1} {mode:>6}: {res['images_per_s']:.2f} images/s, p95 {res['latency_p95']:.2f}s, "
                    f"{res['images']} images in {res['seconds']:.1f}s, CPU s {res.get('cpu')}")
    finally:
        stack.close()
    ratios = {m: [s["images_per_s"] / e["images_per_s"] for s, e in zip(runs[m], runs["engine"])] for m in ("sse", "poll")}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    argv_s = " ".join(["python bench/bench_service.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [SECTION_TITLE, "",
             f"{stamp}, {device}, torch {torch.__version__}; {load}; ratios are taken within a round. "
             f"`{argv_s}`", "",
             f"Workload: {args.jobs} jobs of the engine benchmark's mix ({runs['sse'][0]['images']} images of the "
             f"digits model), all submitted at t = 0. Service = embedded Redis + one worker process (CPU, one torch "
             f"thread, {CAPACITY} samples / {ROWS} rows) + the API (uvicorn), clients in a fourth process over "
             f"loopback HTTP, from the first POST to the last image downloaded. Engine alone = the same jobs (read "
             f"back from Redis) in an in-process engine of the same size, images encoded the same way: the ceiling "
             f"the service can reach. Medians [min-max] of {args.repeats} rounds, order rotating.", "",
             "| median [range] | " + " | ".join(MODE_NAMES[m] for m in MODES) + " |",
             "|---|" + "---:|" * len(MODES)]
    for label, key, fmt in (("images/s", "images_per_s", "{:.2f}"), ("p50 job latency (s)", "latency_p50", "{:.2f}"),
                            ("p95 job latency (s)", "latency_p95", "{:.2f}"), ("wall time (s)", "seconds", "{:.1f}")):
        lines.append(f"| {label} | " + " | ".join(results.median_range([r[key] for r in runs[m]], fmt) for m in MODES) + " |")
    lines += ["", f"Service / engine alone, images/s: event-stream clients {results.median_range(ratios['sse'], '{:.2f}')}x, "
                  f"polling clients {results.median_range(ratios['poll'], '{:.2f}')}x.", "",
              "CPU seconds per service run (median), by process: " + "; ".join(
                  f"{MODE_NAMES[m]}: " + ", ".join(
                      f"{k} {statistics.median(r['cpu'][k] for r in runs[m]):.1f}" for k in runs[m][0]["cpu"])
                  for m in ("sse", "poll")) +
              f"; engine alone: {statistics.median(r['cpu_total'] for r in runs['engine']):.1f} in one process. "
              f"The machine has {os.cpu_count()} cores: what the API, Redis and the clients burn is "
              "taken from the worker, which is CPU-bound here; on a GPU worker the model's time is not.", ""]
    results.publish(SECTION_TITLE, "\n".join(lines), write=not args.no_write, path=RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
