"""Chaos benchmark: the queue under crashes, a Redis restart, a full Redis, 1,000 event streams, uploads.

Real processes on loopback: a redis-server with an append-only file (``appendfsync everysec``), the API
(``eqm api``), two worker supervisors (``eqm worker``, one CPU worker each) serving the bundled digits
model. Phases:

1. clean: N jobs (2 images each, fixed step count, fixed seeds) through the API, no fault: the reference;
2. chaos: the same N jobs again while K random ``kill -9`` hit workers (restarted by their supervisor)
   and supervisors (restarted by this script, as a process manager would), Redis is restarted once
   (SIGTERM, same port and data folder) and held at ``maxmemory`` for a few seconds. Counted: jobs lost,
   images differing from the clean run, final events per job, jobs dead-lettered that were not running
   on a killed worker, the time from each kill to the restart of every job the killed worker was
   running, and every HTTP status the clients saw;
3. streams: the workers stopped, 1,000 queued jobs, one event stream open on each for ``--stream-s``
   while events are appended at ~200/s; other endpoints are timed meanwhile; the API's RSS is sampled;
   at the end every job finishes and every stream must deliver its final event;
4. uploads: 16 concurrent worst-case uploads (the largest RGBA PNG of noise the pixel limit accepts):
   the API's peak RSS, with the decode bound (``EQM_UPLOAD_DECODES=2``) and without it (16).

``python bench/chaos.py`` writes the "## Queue reliability (chaos)" section of ``bench/RESULTS.md``;
``--quick`` runs a small version (no file written).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import machine_load, write_section  # noqa: E402
from service.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from service.jobstore import FINAL_STATUSES, JobSpec, JobStore  # noqa: E402

TITLE = "## Queue reliability (chaos)"
CLAIM_IDLE_MS = 3000
HEARTBEAT_S = 0.5
MAX_DELIVERIES = 3


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Stack:
    """Redis (AOF), the API and two worker supervisors, with their logs in one folder."""

    def __init__(self, workdir: Path, upload_decodes: int = 2, checkpoint: str = "digits", supervisors: int = 3):
        self.workdir = workdir
        self.checkpoint = checkpoint
        self.redis_dir = workdir / "redis"
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(persist=True, workdir=str(self.redis_dir))
        self.api_port = free_port()
        self.api: subprocess.Popen | None = None
        self.supervisors: list[subprocess.Popen | None] = [None] * supervisors
        self.upload_decodes = upload_decodes
        self.logs: list = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", EQM_REDIS_URL=self.redis.url, EQM_CHECKPOINT=self.checkpoint,
                   EQM_HEARTBEAT_S=str(HEARTBEAT_S), EQM_CLAIM_IDLE_MS=str(CLAIM_IDLE_MS), EQM_CAPACITY="16",
                   EQM_MAX_DELIVERIES=str(MAX_DELIVERIES), EQM_MAX_QUEUE="5000", EQM_WAIT_TIMEOUT_S="30",
                   EQM_UPLOAD_DECODES=str(self.upload_decodes), EQM_MAX_UPLOAD_BYTES=str(20 * 1024 * 1024))
        return env

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        self.logs.append(log)
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_redis(self) -> None:
        self.redis.start()
        r = redis.Redis.from_url(self.redis.url)
        r.config_set("appendfsync", "everysec")
        r.close()

    def start_api(self) -> None:
        self.api = self._spawn(["api", "--port", str(self.api_port), "--log-level", "warning"], "api")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the API did not start; see " + str(self.workdir / "api.log"))

    def start_supervisor(self, i: int) -> None:
        self.supervisors[i] = self._spawn(["worker", "--devices", "cpu", "--threads", "1", "--grace-s", "2"], f"sup{i}")

    def worker_pids(self) -> dict[int, int]:  # noqa: D401
        """Supervisor index -> pid of its live worker process."""
        out = {}
        for i, sup in enumerate(self.supervisors):
            if sup is None or sup.poll() is not None:
                continue
            try:
                kids = Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                out[i] = int(kids[0])
        return out

    def stop(self) -> None:
        procs = [p for p in (*self.supervisors, self.api) if p is not None and p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.redis.stop()
        for log in self.logs:
            log.close()


def job_body(i: int, steps: int) -> dict:
    return {"labels": [i % 10, (i + 3) % 10], "n": 1, "seed": 1000 + 2 * i, "max_steps": steps,
            "grad_norm_threshold": 0, "step_size": 0.05, "mu": 0.3}


class Client:
    """Submits jobs through the API, retrying what the API says to retry (429, 503, 507); counts statuses."""

    def __init__(self, base: str):
        self.http = httpx.Client(base_url=base, timeout=30)
        self.statuses: Counter = Counter()
        self.lock = threading.Lock()

    def submit(self, body: dict) -> str:
        for _ in range(600):
            try:
                resp = self.http.post("/v1/generations", json=body)
            except httpx.HTTPError:
                with self.lock:
                    self.statuses["connection error"] += 1
                time.sleep(0.5)
                continue
            with self.lock:
                self.statuses[resp.status_code] += 1
            if resp.status_code == 202:
                return resp.json()["id"]
            if resp.status_code in (429, 503, 507):
                time.sleep(min(1.0, float(resp.headers.get("retry-after", "1")) / 5))
                continue
            raise RuntimeError(f"submission refused: {resp.status_code} {resp.text}")
        raise RuntimeError("submission kept being refused")


def wait_all(store: JobStore, ids: list[str], timeout_s: float, r_holder: list) -> dict[str, dict]:
    """Poll the records until every job is final (tolerates Redis restarts)."""
    deadline = time.monotonic() + timeout_s
    done: dict[str, dict] = {}
    while len(done) < len(ids) and time.monotonic() < deadline:
        try:
            for j in ids:
                if j not in done:
                    rec = store.get(j)
                    if rec is not None and rec["status"] in FINAL_STATUSES:
                        done[j] = rec
        except redis.RedisError:
            pass
        time.sleep(0.5)
    return done


def images_of(store: JobStore, ids: list[str]) -> list[list[np.ndarray | None]]:
    out = []
    for j in ids:
        row = []
        for k in range(2):
            data = store.image(j, k)
            row.append(None if data is None else np.asarray(Image.open(io.BytesIO(data))).astype(np.int16))
        out.append(row)
    return out


def run_jobs(stack: Stack, store: JobStore, n: int, steps: int, rate: float, chaos: dict | None) -> dict:
    client = Client(stack.url)
    ids: list[str | None] = [None] * n
    kills: list[dict] = []
    events: list[str] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def submitter():
        with ThreadPoolExecutor(4) as pool:
            futures = []
            for i in range(n):
                futures.append(pool.submit(lambda i=i: ids.__setitem__(i, client.submit(job_body(i, steps)))))
                time.sleep(1.0 / rate)
            for f in futures:
                f.result()

    def running_on(name: str) -> list[str]:
        known = [j for j in ids if j]
        pipe = store.r.pipeline(transaction=False)
        for j in known:
            pipe.hmget(store.keys.job(j), "status", "worker")
        return [j for j, (st, w) in zip(known, pipe.execute()) if st == b"running" and w and w.decode() == name]

    killed: set[int] = set()

    def serving(pids: dict[int, int]) -> dict[int, int]:
        try:
            fresh = {info.get("pid") for info in store.live_workers(HEARTBEAT_S / 2).values()}
        except redis.RedisError:
            return {}
        return {i: pid for i, pid in pids.items() if pid in fresh and pid not in killed}

    def redis_faults():
        """After the kills (a restart measured against a kill is not also waiting for Redis): a Redis
        restart, then 5 s at maxmemory."""
        span = chaos["span_s"]
        for at, fault in ((span * 0.74, "restart"), (span * 0.82, "full")):
            while time.monotonic() - t0 < at:
                if stop.is_set():
                    return
                time.sleep(0.05)
            now = time.monotonic() - t0
            if fault == "restart":
                events.append(f"{now:.0f} s: Redis restarted (SIGTERM, same port and AOF)")
                stack.redis.stop()
                time.sleep(1.0)
                stack.redis = EmbeddedRedis(port=stack.redis.port, persist=True, workdir=str(stack.redis_dir))
                stack.start_redis()
            else:
                r = redis.Redis.from_url(stack.redis.url)
                r.config_set("maxmemory", "1")
                events.append(f"{now:.0f} s: Redis at maxmemory (noeviction) for 5 s")
                time.sleep(5)
                r.config_set("maxmemory", "0")
                r.close()

    def chaos_thread():
        rng = random.Random(chaos["seed"])
        span = chaos["span_s"]
        at = sorted(rng.uniform(2.0, span * 0.7) for _ in range(chaos["kills"]))
        for when in at:
            while time.monotonic() - t0 < when and not stop.is_set():
                time.sleep(0.05)
            if stop.is_set():
                return
            # Never the last live worker: a restart is measured against a survivor that can reclaim.
            # Live = a worker process whose heartbeat is fresh (a just-killed one still looks fresh for up to
            # 3 heartbeats, a just-restarted one has a pid before it serves): both conditions.
            while len(live := serving(stack.worker_pids())) < 2:
                if stop.is_set():
                    return
                time.sleep(0.1)
            i = rng.choice(sorted(live))
            try:
                workers = store.live_workers(HEARTBEAT_S)
                name = next((w for w, info in workers.items() if info.get("pid") == live[i]), None)
                victims = running_on(name) if name else []
            except redis.RedisError:
                name, victims = None, []
            target = "supervisor" if rng.random() < 0.25 else "worker"
            kill_t = time.time()
            killed.add(live[i])
            if target == "worker":
                os.kill(live[i], signal.SIGKILL)
            else:
                os.kill(stack.supervisors[i].pid, signal.SIGKILL)
                stack.supervisors[i].wait()
            kills.append({"time": kill_t, "target": target, "worker": name, "running": victims})
            if target == "supervisor":
                time.sleep(0.5)
                stack.start_supervisor(i)

    threads = [threading.Thread(target=submitter)]
    if chaos:
        threads += [threading.Thread(target=chaos_thread), threading.Thread(target=redis_faults)]
    for t in threads:
        t.start()
    threads[0].join()
    final = wait_all(store, [j for j in ids if j], 900, [])
    stop.set()
    for t in threads[1:]:
        t.join()
    # after a supervisor kill, restart any that is not running so the stack ends as it began
    for i, sup in enumerate(stack.supervisors):
        if sup is None or sup.poll() is not None:
            stack.start_supervisor(i)
    return {"ids": ids, "final": final, "kills": kills, "events": events, "statuses": client.statuses,
            "wall_s": time.monotonic() - t0}


def restart_latencies(store: JobStore, kills: list[dict]) -> list[float]:
    """Seconds from each kill to the next `started` event of each job the killed worker was running."""
    out = []
    for kill in kills:
        for j in kill["running"]:
            starts = [json.loads(f[b"data"]) for _, f in store.r.xrange(store.keys.events(j))
                      if f[b"event"] == b"started"]
            later = [s["time"] for s in starts if s["time"] > kill["time"]]
            out.append(min(later) - kill["time"] if later else float("inf"))
    return out


# -- streams ---------------------------------------------------------------------------------------

async def _stream(port: int, job: str, result: dict) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        status = int(line.split()[1])
        if status != 200:
            result["errors"] += 1
            result["statuses"][status] += 1
            return
        buf = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                result["cut"] += 1
                return
            buf += chunk
            if b"event: error" in buf:
                result["errors"] += 1
                return
            result["events"] += chunk.count(b"event: ")
            if b"event: done" in buf:
                result["ended"] += 1
                writer.close()
                return
            buf = buf[-64:]
    except (OSError, ValueError, IndexError):
        result["errors"] += 1


def probe(base: str, jobs: list[str], seconds: float, out) -> None:
    """Time other endpoints one after the other, ~20 rounds a second, for ``seconds``."""
    http = httpx.Client(base_url=base, timeout=10)
    rng = random.Random(1)
    latencies: dict[str, list[float]] = {"GET /v1/jobs/{id}": [], "GET /healthz": [], "GET /v1/models": []}
    statuses: Counter = Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, path in (("GET /v1/jobs/{id}", f"/v1/jobs/{rng.choice(jobs)}"), ("GET /healthz", "/healthz"),
                           ("GET /v1/models", "/v1/models")):
            t = time.perf_counter()
            resp = http.get(path)
            latencies[name].append(time.perf_counter() - t)
            if resp.status_code != 200:
                statuses[f"{name} {resp.status_code}"] += 1
        time.sleep(0.05)
    http.close()
    out.put((latencies, statuses))


def streams_phase(stack: Stack, store: JobStore, n: int, seconds: float) -> dict:
    for i, sup in enumerate(stack.supervisors):          # no worker: the jobs stay queued, the streams open
        if sup is not None and sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            sup.wait(timeout=60)
    spec = JobSpec.from_json(json.dumps({"kind": "generate", "model": "digits", "images": [{"seed": 1, "labels": [1]}],
                                         "sampler": {}}))
    jobs = []
    for _ in range(n):
        spec.id = os.urandom(16).hex()
        jobs.append(store.submit(spec))
    result = {"errors": 0, "cut": 0, "ended": 0, "events": 0, "statuses": Counter()}
    latencies: dict[str, list[float]] = {"GET /v1/jobs/{id}": [], "GET /healthz": [], "GET /v1/models": []}
    rss: list[float] = []
    stop = threading.Event()

    def publisher():
        rng = random.Random(0)
        while not stop.is_set():
            for _ in range(20):
                j = rng.choice(jobs)
                store.publish(j, "progress", {"id": j, "images": [{"steps": 1, "grad_norm": 1.0}]})
            time.sleep(0.1)

    def sample_rss():
        while not stop.is_set():
            rss.append(rss_mb(stack.api.pid))
            time.sleep(0.2)

    async def main():
        tasks = [asyncio.create_task(_stream(stack.api_port, j, result)) for j in jobs]
        await asyncio.sleep(3)                            # all connected
        opened = time.monotonic()
        threads = [threading.Thread(target=publisher), threading.Thread(target=sample_rss)]
        for t in threads:
            t.start()
        # The prober runs in its own process: this one is busy with the streams' client side.
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        prober = ctx.Process(target=probe, args=(stack.url, jobs, seconds, queue))
        prober.start()
        await asyncio.sleep(seconds)
        lat, statuses = await asyncio.get_running_loop().run_in_executor(None, queue.get)
        prober.join()
        latencies.update(lat)
        result["statuses"].update(statuses)
        stop.set()
        for t in threads:
            t.join()
        held = time.monotonic() - opened
        for j in jobs:
            store.finish(j, "done")
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return held

    rss_before = rss_mb(stack.api.pid)
    held = asyncio.run(main())
    p95 = {name: 1000 * float(np.percentile(v, 95)) for name, v in latencies.items() if v}
    return {"streams": n, "held_s": held, **result, "p95_ms": p95, "probes": sum(len(v) for v in latencies.values()),
            "rss_before": rss_before, "rss_max": max(rss) if rss else 0.0, "rss_end": rss_mb(stack.api.pid)}


# -- uploads ---------------------------------------------------------------------------------------

def worst_png(side: int) -> bytes:
    """A {side}x{side} RGBA PNG that compresses to almost nothing: cheap to send, costly to decode."""
    image = Image.new("RGBA", (side, side), (40, 80, 120, 200))
    image.paste((200, 40, 40, 90), (side // 4, side // 4, side // 2, side // 2))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def big_model(path: Path) -> str:
    """A tiny-weight pixel model with 256 x 256 RGB images: the API serves its description only."""
    from models.eqm.checkpoint import ModelSpec, save_safetensors
    from models.eqm.network import EqM, EqMConfig
    config = EqMConfig(arch="custom", input_size=256, patch_size=32, in_channels=3, hidden_size=32, depth=1,
                       num_heads=2, num_classes=10, learn_sigma=False)
    save_safetensors(EqM(config), ModelSpec(config, guidance_mode="all", codec="identity"), path)
    return str(path)


def uploads_phase(stack: Stack, model: str, side: int = 4000, count: int = 16) -> dict:
    r = redis.Redis.from_url(stack.redis.url)
    r.hset("eqm:workers", "bench-fake", json.dumps({"device": "cpu", "model": model, "seen": time.time() + 600}))
    png = worst_png(side)
    before = rss_mb(stack.api.pid)

    def upload(_):
        with httpx.Client(base_url=stack.url, timeout=120) as http:
            return http.post("/v1/denoise", files={"image": ("x.png", png, "image/png")}, data={"label": "3"}).status_code

    t0 = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        codes = Counter(pool.map(upload, range(count)))
    took = time.monotonic() - t0
    peak = rss_mb(stack.api.pid, "VmHWM")
    r.hdel("eqm:workers", "bench-fake")
    r.close()
    return {"codes": codes, "rss_before": before, "rss_peak": peak, "seconds": took, "png_kb": len(png) / 1024}


def uploads_on_big_model(decodes: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="eqm-chaos-"))
    stack = Stack(workdir, upload_decodes=decodes, checkpoint=big_model(workdir / "pixels256.safetensors"))
    stack.start_redis()
    stack.start_api()
    try:
        return uploads_phase(stack, "pixels256")
    finally:
        stack.stop()


# -- report ----------------------------------------------------------------------------------------

def compare(clean: list, chaos: list) -> tuple[int, int, int]:
    """(images compared, images differing by more than 1 grey level anywhere, byte-different images)."""
    compared = differing = 0
    for a_row, b_row in zip(clean, chaos):
        for a, b in zip(a_row, b_row):
            if a is None or b is None:
                continue
            compared += 1
            differing += int(np.abs(a - b).max() > 1)
    return compared, differing, 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rate", type=float, default=0.8, help="jobs submitted per second")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--stream-s", type=float, default=60.0)
    p.add_argument("--quick", action="store_true", help="small run, nothing written")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.jobs, args.kills, args.streams, args.stream_s = 30, 4, 100, 5.0
    started = datetime.now(timezone.utc)
    load_at_start = machine_load()
    workdir = Path(tempfile.mkdtemp(prefix="eqm-chaos-"))
    stack = Stack(workdir)
    stack.start_redis()
    stack.start_api()
    for i in range(len(stack.supervisors)):
        stack.start_supervisor(i)
    r = redis.Redis.from_url(stack.redis.url)
    store = JobStore(r)
    t = time.monotonic()
    while len(store.live_workers(HEARTBEAT_S)) < 3:
        if time.monotonic() - t > 120:
            raise RuntimeError("workers did not start; see " + str(workdir))
        time.sleep(0.5)
    try:
        print(f"phase 1: {args.jobs} jobs, no fault", flush=True)
        clean = run_jobs(stack, store, args.jobs, args.steps, args.rate, None)
        clean_images = images_of(store, clean["ids"])
        print(f"  {len(clean['final'])} final in {clean['wall_s']:.0f}s", flush=True)
        while len(store.live_workers(HEARTBEAT_S)) < 3:
            time.sleep(0.5)
        print(f"phase 2: {args.jobs} jobs, {args.kills} kill -9, a Redis restart, Redis full", flush=True)
        span = args.jobs / args.rate + 5
        chaos = run_jobs(stack, store, args.jobs, args.steps, args.rate,
                         {"seed": args.seed, "kills": args.kills, "span_s": span})
        store = JobStore(redis.Redis.from_url(stack.redis.url))
        chaos_images = images_of(store, chaos["ids"])
        final = chaos["final"]
        statuses = Counter(rec["status"] for rec in final.values())
        dead = {f[b"id"].decode() for _, f in store.r.xrange(store.keys.deadletter)}
        ran_on_killed = {j for k in chaos["kills"] for j in k["running"]}
        innocent = sorted(dead - ran_on_killed)
        finals_per_job = Counter()
        for j in chaos["ids"]:
            names = [f[b"event"].decode() for _, f in store.r.xrange(store.keys.events(j))]
            finals_per_job[sum(1 for e in names if e in FINAL_STATUSES)] += 1
        lats = restart_latencies(store, chaos["kills"])
        compared, differing, _ = compare(clean_images, chaos_images)
        attempts = Counter(rec["attempts"] for rec in final.values())
        print("  kill -> restart (s): " + ", ".join(f"{x:.2f}" for x in lats), flush=True)
        print(f"  {statuses}, kills {len(chaos['kills'])}, restarts {len(lats)}, max "
              f"{max(lats) if lats else 0:.2f}s, differing {differing}/{compared}, dead {len(dead)} "
              f"(innocent {len(innocent)}), finals per job {dict(finals_per_job)}", flush=True)
        print(f"phase 3: {args.streams} event streams for {args.stream_s:.0f}s", flush=True)
        streams = streams_phase(stack, store, args.streams, args.stream_s)
        print(f"  {streams}", flush=True)
        print("phase 4: 16 concurrent 4000x4000 RGBA uploads to the digits API", flush=True)
        digits_up = uploads_phase(stack, "digits")
        print(f"  {digits_up}", flush=True)
    finally:
        stack.stop()
    print("phase 4b: the same to a 256 x 256 model's API, decode bound 2, then 16 (no bound)", flush=True)
    bounded = uploads_on_big_model(2)
    print(f"  {bounded}", flush=True)
    unbounded = uploads_on_big_model(16)
    print(f"  {unbounded}", flush=True)

    kills = chaos["kills"]
    lost = args.jobs - len(final)
    bad_5xx = {k: v for k, v in (chaos["statuses"] + clean["statuses"]).items()
               if isinstance(k, int) and k >= 500 and k not in (503, 507)}
    finite = [x for x in lats if x != float("inf")]
    never = len(lats) - len(finite)
    bound = CLAIM_IDLE_MS / 1000 + 2 * HEARTBEAT_S
    section = f"""{TITLE}

{started:%Y-%m-%d %H:%M} UTC, CPU ({platform.machine()}, {os.cpu_count()} cores; {load_at_start}), loopback;
`python bench/chaos.py` (seed {args.seed}). Real processes: redis-server {'with AOF (appendfsync everysec)'}, `eqm api`,
three `eqm worker` supervisors with one CPU worker each (capacity 16, 1 thread), bundled digits model;
`claim_idle_ms` {CLAIM_IDLE_MS}, heartbeat {HEARTBEAT_S} s, `max_deliveries` {MAX_DELIVERIES}.

**Crashes.** {args.jobs} jobs (2 images, {args.steps} NAG-GD updates each, fixed seeds) submitted at {args.rate:g}/s,
first with no fault (the reference run), then again while {len(kills)} random `kill -9` hit workers
({sum(1 for k in kills if k['target'] == 'worker')}) and supervisors ({sum(1 for k in kills if k['target'] == 'supervisor')};
restarted by the script, as a process manager would; a kill waits until two workers are live, so a
survivor can reclaim), Redis was restarted once and held at `maxmemory` for 5 s
({'; '.join(chaos['events'])}).

| | result |
|---|---:|
| jobs lost (not final at the end) | {lost} |
| jobs done / failed | {statuses.get('done', 0)} / {statuses.get('failed', 0)} |
| images differing from the reference run (> 1 grey level) | {differing} of {compared} |
| jobs with exactly one final event | {finals_per_job.get(1, 0)} of {args.jobs} |
| dead-lettered / of them not running on a killed worker | {len(dead)} / {len(innocent)} |
| jobs running on a killed worker (restarts measured) | {len(lats)} |
| kill -> restart of those jobs: median / max (s) | {statistics.median(finite) if finite else 0:.2f} / {max(finite) if finite else 0:.2f} (bound: claim_idle + 2 heartbeats = {bound:.1f}; never restarted: {never}) |
| attempts per job (count) | {', '.join(f'{a}: {c}' for a, c in sorted(attempts.items()))} |
| HTTP statuses seen by the submitting clients (both runs) | {', '.join(f'{k}: {v}' for k, v in sorted((chaos['statuses'] + clean['statuses']).items(), key=str))} |
| 5xx other than the documented 503 / 507 | {sum(bad_5xx.values())} |
| wall time, reference / chaos run (s) | {clean['wall_s']:.0f} / {chaos['wall_s']:.0f} |

A kill of a supervisor reaches its worker as "parent gone": it hands its jobs back at once (restart measured
the same way). Restart times include the wait for a free slot in the surviving worker.

**Event streams.** {streams['streams']} concurrent `GET /v1/jobs/{{id}}/events` on one API process held
{streams['held_s']:.0f} s while ~200 events/s were appended, then every job finished: {streams['ended']} streams
delivered their final event, {streams['errors']} errors, {streams['cut']} cut. Other endpoints meanwhile
({streams['probes']} requests), p95: {', '.join(f'{k} {v:.1f} ms' for k, v in streams['p95_ms'].items())};
non-200 answers: {dict(streams['statuses']) or 'none'}. API RSS: {streams['rss_before']:.0f} MB before,
{streams['rss_max']:.0f} MB max with the streams open, {streams['rss_end']:.0f} MB after. (Before the shared
reader each stream held a pooled Redis connection: about 100 per process, the rest got 503.)

**Uploads.** 16 concurrent `POST /v1/denoise` of a {bounded['png_kb']:.0f} KB 4000x4000 RGBA PNG (16 M pixels,
compressible: cheap to send, ~64 MB to decode). Digits API (pixel limit 1 M, from the model's 8x8): statuses
{dict(digits_up['codes'])}, refused from the header before decoding, peak RSS {digits_up['rss_peak']:.0f} MB
(from {digits_up['rss_before']:.0f} MB). API of a 256 x 256 model (pixel limit 16 M, so they are decoded): peak
RSS {bounded['rss_peak']:.0f} MB (from {bounded['rss_before']:.0f} MB) with at most 2 decodes at a time, in
{bounded['seconds']:.1f} s; without the bound (`EQM_UPLOAD_DECODES=16`, as before): {unbounded['rss_peak']:.0f} MB
(from {unbounded['rss_before']:.0f} MB) in {unbounded['seconds']:.1f} s. Statuses {dict(bounded['codes'])} /
{dict(unbounded['codes'])} (202 queued; no worker consumes them).
"""
    print(section)
    if not args.quick:
        write_section(TITLE, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
