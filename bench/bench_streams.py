"""Other requests while many event streams are held: one hot job, and as many jobs as streams.

Stack, all on loopback: an embedded redis-server and the API (``eqm api``, one uvicorn process). The
jobs' events come from a stand-in worker process that writes exactly what ``service.worker`` writes for
a running job (the same scripts: ``started``, a ``progress`` event every 0.3 s carrying every image's
norms since the previous one, an ``image`` event per image with its remaining norms, then ``done``), at
a fixed pace: each job takes ``--steps`` updates on 8 images in ``--hold-s`` seconds. No model runs, so
the two cores of this machine go to the API, the clients and Redis.

- ``hot``: ``--streams`` clients follow one job;
- ``many``: ``--streams`` clients follow one job each, all running at once (the same number of
  deliveries per second as ``hot``: one event per stream every 0.3 s).

A client process opens every stream (``GET /v1/jobs/{id}/events``, raw sockets) as the jobs start and
reads them to their ``done`` event; a prober process meanwhile times ``GET /v1/models`` every 20 ms.
Figures: p50 / p95 of those probes while every stream is open (from the last stream's first event
to the jobs' end). The API runs from this checkout (``after``) and from ``--baseline`` (``before``, a
git ref exported to a temporary folder), alternating; medians [range] over ``--repeats``.

Usage:
  python bench/bench_streams.py [--streams 1000] [--hold-s 20] [--repeats 3] [--baseline REF] [--no-write]
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))     # `python bench/bench_streams.py` from anywhere

import httpx                                                        # noqa: E402
import redis                                                        # noqa: E402

from bench import results                                          # noqa: E402
from service.embedded_redis import EmbeddedRedis, free_port         # noqa: E402
from service.jobstore import JobSpec, JobStore                          # noqa: E402
from service.progress import JobProgress                            # noqa: E402

SECTION_TITLE = "## Event streams held: other requests"
IMAGES = 8
PROGRESS_INTERVAL_S = 0.3          # service.worker.WorkerConfig.progress_interval_s
PROBE_EVERY_S = 0.02
WORKER = "bench-worker"


# -- the stand-in worker -----------------------------------------------------------------------------

def run_jobs(redis_url: str, job_ids: list[str], steps: int, seconds: float, go) -> None:
    """Publish, for every job, what a worker running it publishes: started, progress every
    PROGRESS_INTERVAL_S (jobs staggered over the interval), image events, done; ``steps`` in ``seconds``."""
    store = JobStore(redis.Redis.from_url(redis_url))
    k = store.keys
    go.wait()
    rng = random.Random(0)
    for job_id in job_ids:
        store.scripts.take(keys=[k.job(job_id), k.queued, k.queued_for("digits")], args=[WORKER, job_id, "0", 3])
        store.scripts.start(keys=[k.job(job_id), k.queued, k.events(job_id)],
                            args=[repr(time.time()), WORKER, job_id, 3600,
                                  json.dumps({"id": job_id, "worker": WORKER, "time": time.time(), "reclaimed": False})])
    progress = {j: JobProgress(IMAGES) for j in job_ids}
    start = time.monotonic()
    offset = {j: PROGRESS_INTERVAL_S * i / len(job_ids) for i, j in enumerate(job_ids)}
    sent = {j: 0.0 for j in job_ids}
    done: set[str] = set()
    while len(done) < len(job_ids):
        now = time.monotonic() - start
        pipe = store.r.pipeline(transaction=False)
        for j in job_ids:
            if j in done or now - sent[j] < PROGRESS_INTERVAL_S + offset[j] * (sent[j] == 0.0):
                continue
            sent[j] = now
            prog = progress[j]
            target = min(steps, int(steps * now / seconds))
            taken = prog.images[0]["steps"]
            for step in range(taken + 1, target + 1):
                for index in range(IMAGES):
                    prog.update(index, step, 10.0 * rng.random())
            if target < steps:
                store.publish(j, "progress", {"id": j, "time": time.time(), "images": prog.event_images()},
                              worker=WORKER, progress=json.dumps(prog.summary()), client=pipe)
                prog.sent()
                continue
            for index in range(IMAGES):
                norms = prog.finish(index, steps, 10.0 * rng.random(), False)
                store.publish(j, "image", {"id": j, "index": index, "steps": steps, "grad_norm": norms[-1],
                                           "stopped_early": False, "deadline_exceeded": False,
                                           "content_type": "image/png", "norms": norms},
                              worker=WORKER, mark=f"ready:{index}", client=pipe)
            done.add(j)
        pipe.execute()
        for j in done:
            if progress[j] is not None:
                store.finish(j, "done", worker=WORKER, progress=json.dumps(progress[j].summary()))
                progress[j] = None
        time.sleep(0.01)


# -- the clients ---------------------------------------------------------------------------------------

async def _stream(port: int, job: str, out: dict, first_event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        if int((await reader.readline()).split()[1]) != 200:
            out["errors"] += 1
            return
        tail, seen_first = b"", False
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                out["cut"] += 1
                return
            out["bytes"] += len(chunk)
            out["events"] += chunk.count(b"\nevent: ")
            if not seen_first and b"event: " in chunk:
                seen_first = True
                first_event()
            tail = tail[-32:] + chunk
            if b"event: done" in tail:
                out["ended"] += 1
                writer.close()
                return
    except (OSError, ValueError, IndexError):
        out["errors"] += 1


def follow_all(port: int, jobs: list[str], go, opened, queue) -> None:
    """Open one stream per entry of ``jobs`` once ``go`` is set; ``opened`` is set when every stream saw its
    first event; puts the counts when every stream ended."""
    out = {"errors": 0, "cut": 0, "ended": 0, "events": 0, "bytes": 0}

    async def main():
        seen = 0

        def first_event():
            nonlocal seen
            seen += 1
            if seen == len(jobs):
                opened.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        await asyncio.gather(*(_stream(port, j, out, first_event) for j in jobs))
    asyncio.run(main())
    queue.put(out)


def probe(base: str, stop, queue) -> None:
    """(monotonic time, seconds) of GET /v1/models every PROBE_EVERY_S until ``stop``."""
    http = httpx.Client(base_url=base, timeout=30)
    times, failed = [], 0
    while not stop.is_set():
        t = time.perf_counter()
        if http.get("/v1/models").status_code != 200:
            failed += 1
        times.append((time.monotonic(), time.perf_counter() - t))
        time.sleep(PROBE_EVERY_S)
    http.close()
    queue.put((times, failed))


# -- one run -----------------------------------------------------------------------------------------

def start_api(src: Path, redis_url: str, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1", EQM_REDIS_URL=redis_url, EQM_CHECKPOINT="digits",
               EQM_MAX_QUEUE="100000")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port", str(port), "--log-level", "warning"],
                            cwd=src, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the API did not start; see {log}")


def one_run(src: Path, case: str, streams: int, steps: int, hold_s: float, workdir: Path) -> dict:
    emb = EmbeddedRedis().start()
    port = free_port()
    api = start_api(src, emb.url, port, workdir / "api.log")
    ctx = multiprocessing.get_context("spawn")
    try:
        store = JobStore(redis.Redis.from_url(emb.url))
        n_jobs = 1 if case == "hot" else streams
        jobs = []
        for i in range(n_jobs):
            spec = JobSpec.from_json(json.dumps({"kind": "generate", "model": "digits", "sampler": {"max_steps": steps},
                                                 "images": [{"seed": s, "labels": [s % 10]} for s in range(IMAGES)]}))
            jobs.append(store.submit(spec))
        followed = jobs * streams if case == "hot" else jobs
        go, opened, stop = ctx.Event(), ctx.Event(), ctx.Event()
        counts, probes = ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=run_jobs, args=(emb.url, jobs, steps, hold_s, go)),
                 ctx.Process(target=follow_all, args=(port, followed, go, opened, counts)),
                 ctx.Process(target=probe, args=(f"http://127.0.0.1:{port}", stop, probes))]
        for p in procs:
            p.start()
        time.sleep(2.0)                      # every process up, the prober timing an idle API
        go.set()
        t_go = time.monotonic()
        opened.wait(hold_s + 120)
        t_open = time.monotonic()
        out = counts.get(timeout=hold_s + 300)
        t_end = time.monotonic()
        stop.set()
        times, failed = probes.get(timeout=60)
        for p in procs:
            p.join(60)
    finally:
        api.terminate()
        api.wait(30)
        emb.stop()
    held = [s for t, s in times if t_open <= t <= t_end]
    idle = [s for t, s in times if t < t_go]
    return {**out, "failed": failed, "connect_s": t_open - t_go, "held_s": t_end - t_open,
            "p50": percentile(held, 50), "p95": percentile(held, 95), "idle_p50": percentile(idle, 50),
            "probes": len(held)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def export(ref: str, into: Path) -> Path:
    """The tree of git ``ref`` in a folder (the API runs from there for ``before``)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--hold-s", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="hot,many")
    ap.add_argument("--baseline", default="", help="git ref of the code to compare with (default: none)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load = results.machine_load()
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="eqm-streams-") as tmp:
        versions = {"after": ROOT}
        if args.baseline:
            versions = {"before": export(args.baseline, Path(tmp) / "before"), "after": ROOT}
        cases = args.cases.split(",")
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.repeats):
            for case in cases:
                order = list(versions) if r % 2 == 0 else list(reversed(versions))
                for name in order:
                    res = one_run(versions[name], case, args.streams, args.steps, args.hold_s, Path(tmp))
                    runs.setdefault((case, name), []).append(res)
                    print(f"{case:5s} {name:6s} p50 {res['p50']:7.1f} ms  p95 {res['p95']:7.1f} ms  "
                          f"({res['probes']} probes over {res['held_s']:.1f} s held; connect {res['connect_s']:.1f} s; "
                          f"ended {res['ended']}/{args.streams}, errors {res['errors']}, cut {res['cut']}, "
                          f"{res['events']} events, idle p50 {res['idle_p50']:.1f} ms)", flush=True)
    text = section(args, runs, versions, load, started)
    results.publish(SECTION_TITLE, text, write=not args.no_write)
    return 0


def section(args, runs, versions, load, started) -> str:
    mr = results.median_range
    names = {"hot": f"{args.streams} streams on one job", "many": f"{args.streams} streams on {args.streams} jobs"}
    rows = []
    for (case, name), rs in runs.items():
        rows.append(f"| {names[case]} | {name} | {mr([r['p50'] for r in rs], '{:.1f}')} | "
                    f"{mr([r['p95'] for r in rs], '{:.1f}')} | {mr([r['connect_s'] for r in rs], '{:.1f}')} | "
                    f"{sum(r['ended'] for r in rs)}/{args.streams * len(rs)} | "
                    f"{statistics.median(r['events'] for r in rs):.0f} |")
    cmd = "python bench/bench_streams.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("streams", args.streams), ("hold_s", args.hold_s),
                                                     ("repeats", args.repeats), ("baseline", args.baseline)) if v)
    return f"""{SECTION_TITLE}

{started:%Y-%m-%d %H:%M} UTC, CPU ({platform.machine()}, {os.cpu_count()} cores; {load}: other people's work
was running), loopback; `{cmd}`. One API process (uvicorn, h11); a stand-in worker publishes what a worker
publishes for jobs of {IMAGES} images x {args.steps} steps taking {args.hold_s:.0f} s (progress every
{PROGRESS_INTERVAL_S} s); the clients open every stream as the jobs start and read to `done`. Probes:
`GET /v1/models` every {PROBE_EVERY_S * 1000:.0f} ms from another process, counted while every stream is
open. `before`: the API at `{args.baseline or '-'}` (each follower decodes and formats every event itself,
and waits through three tasks per event); `after`: this code. Medians [range] of {args.repeats} alternating runs.

| streams | API | other request p50 (ms) | p95 (ms) | all streams open after (s) | streams ended | events delivered |
|---|---|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
