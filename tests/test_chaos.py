"""Faults, each in a bounded form (seconds): reclaim behind a long pending list, blame only the running
job, fencing after a pause, records expiring while queued or running, a full Redis, exact admission,
atomic cancel, per-key ownership, many event streams on one API process, slow requests, dead-worker
pruning. Real redis-server, real worker processes, real uvicorn on loopback; ``bench/chaos.py`` runs the
long version (hundreds of jobs, dozens of ``kill -9``) and writes the figures.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from PIL import Image

from service.api.app import create_app
from service.api.server import uvicorn_options
from service.embedded_redis import EmbeddedRedis, free_port
from service.jobstore import ImageSpec, JobSpec, JobStore, QueueFull, SamplerSpec
from service.settings import Settings
from tests.test_api import digits_file, heartbeat, make_client  # noqa: F401  (fixtures)
from tests.test_worker_redis import (CLAIM_IDLE_MS, HEARTBEAT_S, checkpoint, events,  # noqa: F401
                                     final, live_workers, long_job, procs, running_with_progress, store, wait_for)


def short_job(steps: int = 20, n: int = 1, **kw) -> JobSpec:
    return JobSpec(kind="generate", model="tiny", images=[ImageSpec(seed=k, labels=[k % 10]) for k in range(n)],
                   sampler=SamplerSpec(step_size=0.01, max_steps=steps), **kw)


def keys_without_ttl(r: redis.Redis) -> list[str]:
    """Job keys that would live forever (the stream, group, queued set and registry are meant to)."""
    return sorted(k.decode() for k in r.scan_iter("eqm:job:*") if r.ttl(k) == -1)


# -- reclaim, blame, fencing ----------------------------------------------------------------------

def test_reclaim_reaches_dead_entries_behind_a_live_workers_long_pending_list(store, procs, redis_client):
    """20 entries of a live consumer (its heartbeat keeps them fresh) sit before 5 of a dead one:
    XAUTOCLAIM from 0-0 scans only 10 x COUNT entries per call, so without walking its cursor the dead
    consumer's jobs would never be reached."""
    k = store.keys
    jobs = [store.submit(short_job()) for _ in range(25)]
    redis_client.xreadgroup(k.group, "live-elsewhere", {k.stream_for("tiny"): ">"}, count=20)
    redis_client.xreadgroup(k.group, "dead-elsewhere", {k.stream_for("tiny"): ">"}, count=5)
    live_ids = [e["message_id"]
                for e in redis_client.xpending_range(k.stream_for("tiny"), k.group, "-", "+", 100, "live-elsewhere")]
    stop = threading.Event()

    def live_heartbeat():              # what a live worker's heartbeat does for its entries
        r = redis.Redis.from_url(procs.redis_url)
        while not stop.wait(HEARTBEAT_S):
            r.xclaim(k.stream_for("tiny"), k.group, "live-elsewhere", min_idle_time=0, message_ids=live_ids, justid=True)

    beat = threading.Thread(target=live_heartbeat, daemon=True)
    beat.start()
    try:
        procs.worker(capacity=8)
        live_workers(store, 1, procs)
        t0 = time.monotonic()
        done = [final(store, j, procs, timeout=30) for j in jobs[20:]]
        took = time.monotonic() - t0
    finally:
        stop.set()
        beat.join()
    assert [r["status"] for r in done] == ["done"] * 5
    assert took < CLAIM_IDLE_MS / 1000 + 8, took
    still = redis_client.xpending_range(k.stream_for("tiny"), k.group, "-", "+", 100, "live-elsewhere")
    assert len(still) == 20                                   # a live worker's entries are never taken
    assert all(store.get(j)["status"] == "queued" for j in jobs[:20])


def test_a_crash_blames_only_the_job_that_was_running(store, procs):
    """One sample slot: job A runs, B and C wait in the worker. kill -9, max_deliveries 1: A is
    dead-lettered (it was running), B and C were only fetched and run to the end elsewhere, once."""
    victim = procs.worker("--max-deliveries", "1", capacity=1)
    live_workers(store, 1, procs)
    a = store.submit(long_job(images=[ImageSpec(seed=1, labels=[3])]))
    running_with_progress(store, a, procs)
    b, c = store.submit(short_job(40)), store.submit(short_job(40))
    name = store.get(a)["worker"]
    wait_for(lambda: store.get(b)["worker"] == name, 10, "the worker to fetch B", procs)
    assert store.get(b)["status"] == "queued" and store.get(b)["attempts"] == 0
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    procs.worker("--max-deliveries", "1", capacity=1)
    rec_a, rec_b, rec_c = (final(store, j, procs, timeout=40) for j in (a, b, c))
    assert rec_a["status"] == "failed" and rec_a["error"].startswith("dead-lettered: the worker running it stopped")
    assert (rec_b["status"], rec_b["attempts"], rec_c["status"], rec_c["attempts"]) == ("done", 1, "done", 1)
    assert store.queue_depth() == 0


def test_a_paused_worker_drops_the_job_another_worker_took_over(store, procs):
    """SIGSTOP past claim_idle_ms: another worker reclaims the job; once resumed, the first one drops it
    at its next heartbeat and writes nothing more: one final event, one image event per image."""
    first = procs.worker()
    live_workers(store, 1, procs)
    job = store.submit(long_job(2500))
    rec = running_with_progress(store, job, procs)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        procs.worker()
        wait_for(lambda: store.get(job)["attempts"] == 2, 20, "another worker to take the job over", procs)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    done = final(store, job, procs, timeout=60)
    assert done["status"] == "done" and done["worker"] != rec["worker"]
    names = events(store, job)
    assert names.count("image") == 2 and names.count("done") == 1 and names.count("started") == 2
    wait_for(lambda: "dropped (claimed by another worker)" in procs.tail(200), 10, "the paused worker to drop it",
             procs)
    assert first.poll() is None                                  # it lives on, and serves the next job
    assert store.queue_depth() == 0


# -- job lifetime -----------------------------------------------------------------------------------

def test_records_expiring_while_queued_or_running_leave_nothing_behind(redis_client, procs):
    """TTL 2 s: a job that expires in the queue is skipped and leaves the queued set; one that expires
    while running is dropped and never re-created by progress writes; nothing is left without a TTL."""
    store = JobStore(redis_client, ttl_s=2)
    procs.env["EQM_RESULT_TTL_S"] = "2"
    queued = store.submit(short_job())
    time.sleep(2.3)
    assert store.get(queued) is None and store.queue_depth() == 1          # phantom until a worker reads it
    procs.worker()
    live_workers(store, 1, procs)
    wait_for(lambda: store.queue_depth() == 0, 10, "the expired job to leave the queued set", procs)
    running = store.submit(long_job())
    running_with_progress(store, running, procs)
    wait_for(lambda: store.get(running) is None, 10, "the running job's record to expire", procs)
    time.sleep(4 * HEARTBEAT_S)
    assert store.get(running) is None and keys_without_ttl(redis_client) == []
    k = store.keys
    wait_for(lambda: redis_client.xpending(k.stream_for("tiny"), k.group)["pending"] == 0, 10, "the entries to be acked", procs)
    after = store.submit(short_job())                            # the worker goes on serving
    assert final(store, after, procs)["status"] == "done"
    assert store.queue_depth() == 0 and keys_without_ttl(redis_client) == []
    assert 0 < redis_client.ttl(k.job(after)) <= 2


def test_ttl_runs_from_the_finish_for_every_key_of_the_job(redis_client, procs):
    store = JobStore(redis_client, ttl_s=50)
    job = store.submit(short_job(n=2))
    time.sleep(3)                                               # waits in the queue, no worker yet
    procs.env["EQM_RESULT_TTL_S"] = "50"
    procs.worker()
    assert final(store, job, procs)["status"] == "done"
    k = store.keys
    for key in (k.job(job), k.events(job), k.image(job, 0), k.image(job, 1)):
        assert 48 <= redis_client.ttl(key) <= 50, key


def test_cancel_and_finish_never_recreate_a_record(store, redis_client):
    assert store.cancel("nope") is None and store.finish("nope", "done") == 0
    assert redis_client.keys("eqm:job:*") == []
    job = store.submit(short_job())
    redis_client.delete(store.keys.job(job))
    assert store.cancel(job) is None and store.publish(job, "progress", {"id": job}) == 0
    assert redis_client.exists(store.keys.job(job)) == 0
    other = store.submit(short_job())
    assert store.cancel(other) == "cancelled" and store.queue_depth() == 1    # the first: expired, not read yet
    assert events(store, other)[-1] == "cancelled" and store.cancel(other) == "cancelled"
    assert keys_without_ttl(redis_client) == []


def test_queue_limit_is_exact_under_concurrent_submissions(store):
    def attempt(_):
        try:
            return store.submit(short_job(), max_queue=10)
        except QueueFull:
            return None

    with ThreadPoolExecutor(16) as pool:
        accepted = [j for j in pool.map(attempt, range(40)) if j]
    assert len(accepted) == 10 and store.queue_depth() == 10
    assert store.r.xlen(store.keys.stream_for("tiny")) == 10


# -- Redis full -------------------------------------------------------------------------------------

@pytest.fixture
def redis_full(redis_client):
    """``full(True)``: maxmemory below what Redis uses (noeviction: every write refused)."""
    def full(on: bool) -> None:
        redis_client.config_set("maxmemory", "1" if on else "0")
    yield full
    full(False)


def test_a_full_redis_is_507_nothing_half_written_and_workers_wait(store, procs, redis_client, redis_full,
                                                                     make_client):
    procs.worker()
    live_workers(store, 1, procs)
    job = store.submit(long_job(2500))
    running_with_progress(store, job, procs)
    client = make_client(heartbeat_s=60.0)
    before = sorted(redis_client.keys("*"))
    redis_full(True)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            store.submit(short_job())
        resp = client.post("/v1/generations", json={"labels": [1]})
        assert resp.status_code == 507 and "out of memory" in resp.json()["detail"], resp.text
        assert client.get(f"/v1/jobs/{job}").status_code == 200           # reads still work
        time.sleep(2.0)
        assert all(p.poll() is None for p in procs.procs), procs.tail()   # the worker waits, it does not crash
        assert sorted(redis_client.keys("*")) == before
    finally:
        redis_full(False)
    rec = final(store, job, procs, timeout=60)
    assert rec["status"] == "done" and rec["attempts"] == 1 and rec["error"] is None
    assert "redis out of memory" in procs.tail(400)
    assert final(store, store.submit(short_job()), procs)["status"] == "done"


# -- API: ownership, streams, slow requests ---------------------------------------------------------

def test_key_a_cannot_read_or_cancel_key_bs_job(make_client, redis_client):
    heartbeat(redis_client)
    client = make_client(api_keys=("key-a", "key-b"), admin_keys=("key-admin",))
    auth = lambda key: {"Authorization": f"Bearer {key}"}                  # noqa: E731
    made = client.post("/v1/generations", json={"labels": [1], "n": 2}, headers=auth("key-b"))
    assert made.status_code == 202, made.text
    links = made.json()["links"]
    for path in (links["self"], links["events"], links["images"][0]):
        assert client.get(path, headers=auth("key-a")).status_code == 404, path
    assert client.delete(links["self"], headers=auth("key-a")).status_code == 404
    assert redis_client.hget(f"eqm:job:{made.json()['id']}", "cancel") is None
    assert redis_client.hget(f"eqm:job:{made.json()['id']}", "owner").decode() not in ("key-b", "key-a")
    assert client.get(links["self"], headers=auth("key-admin")).status_code == 200
    assert client.get(links["self"], headers=auth("key-b")).json()["status"] == "queued"
    assert client.delete(links["self"], headers=auth("key-b")).status_code == 200


class Uvicorn:
    """The API app in a real uvicorn server, in a thread, on a loopback port."""

    def __init__(self, settings: Settings):
        import uvicorn
        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Uvicorn":
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "uvicorn to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


async def _sse_until_final(port: int, path: str) -> tuple[int, list[str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    events, buf = [], b""
    while status == 200:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf += chunk
        events = [line[7:] for line in buf.decode(errors="replace").splitlines() if line.startswith("event: ")]
        if events and events[-1] in ("done", "failed", "cancelled"):
            break
    writer.close()
    return status, events


def test_hundreds_of_event_streams_share_one_redis_reader(redis_url, redis_client, digits_file):
    """300 open streams on an API process with a pool of 4 Redis connections: each gets
    every event and its end; nothing is answered 503 (the old design held a connection per stream)."""
    store = JobStore(redis_client)
    heartbeat(redis_client, model="tiny", age_s=-60)     # a live worker of the jobs' model: the API keeps them
    settings = Settings(redis_url=redis_url, checkpoint=digits_file, redis_pool_size=4, heartbeat_s=60.0,
                        wait_timeout_s=30.0)
    jobs = [store.submit(short_job()) for _ in range(300)]

    async def scenario(port: int):
        streams = [asyncio.create_task(_sse_until_final(port, f"/v1/jobs/{j}/events")) for j in jobs]
        await asyncio.sleep(2.0)                      # all open and following
        for j in jobs:
            store.publish(j, "progress", {"id": j, "images": [{"steps": 1, "grad_norm": 1.0}]})
            store.finish(j, "done")
        return await asyncio.wait_for(asyncio.gather(*streams), 60)

    with Uvicorn(settings) as api:
        results = asyncio.run(scenario(api.port))
        assert api.server.config.loaded_app is not None
    assert [s for s, _ in results] == [200] * 300
    assert all(ev == ["queued", "progress", "done"] for _, ev in results), results[:3]


def test_waits_share_the_reader_too(redis_url, redis_client, digits_file):
    import httpx
    heartbeat(redis_client, age_s=-60)
    settings = Settings(redis_url=redis_url, checkpoint=digits_file, redis_pool_size=4, heartbeat_s=60.0,
                        wait_timeout_s=30.0)
    store = JobStore(redis_client)

    async def scenario(port: int):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                     limits=httpx.Limits(max_connections=200)) as client:
            posts = [asyncio.create_task(client.post("/v1/generations?wait=true", json={"labels": [1]}))
                     for _ in range(120)]
            ids = []
            deadline = time.monotonic() + 20
            while len(ids) < 120 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                ids = [j for j in store.r.smembers(store.keys.queued)]
            for j in ids:
                store.finish(j.decode(), "done")
            return await asyncio.gather(*posts)

    with Uvicorn(settings) as api:
        responses = asyncio.run(scenario(api.port))
    assert sorted({r.status_code for r in responses}) == [200], {r.status_code: r.text for r in responses}
    assert all(r.json()["status"] == "done" for r in responses)


def test_slow_headers_and_stalled_bodies_are_cut(redis_url, digits_file, redis_client):
    heartbeat(redis_client, age_s=-60)
    settings = Settings(redis_url=redis_url, checkpoint=digits_file, header_timeout_s=1.0, body_timeout_s=1.0,
                        heartbeat_s=60.0)
    with Uvicorn(settings) as api:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")          # never finishes its headers
            t0 = time.monotonic()
            assert s.recv(100) == b""                                    # closed by the server
            assert 0.8 < time.monotonic() - t0 < 5
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
            s.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"labels\":")           # the rest never comes
            reply = s.recv(1000)
            assert reply.startswith(b"HTTP/1.1 408"), reply
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:   # a normal request still works
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")


def test_upload_pixel_limit_follows_the_model(make_client, redis_client):
    heartbeat(redis_client)
    client = make_client(max_upload_bytes=5_000_000, max_upload_pixels=16_000_000)

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (w, h), 128).save(buf, "PNG")
        return buf.getvalue()

    big = client.post("/v1/denoise", files={"image": ("x.png", png(1100, 1000), "image/png")})
    assert big.status_code == 413 and "over the limit of 1048576" in big.json()["detail"], big.text
    ok = client.post("/v1/denoise", files={"image": ("x.png", png(1024, 1024), "image/png")})
    assert ok.status_code == 202, ok.text


def test_dead_workers_are_pruned_once_they_hold_nothing(store, procs, redis_client):
    k = store.keys
    store.ensure_group("tiny")
    stale = json.dumps({"device": "cpu", "model": "tiny", "seen": time.time() - 3600})
    for name in ("gone-empty", "gone-busy"):
        redis_client.hset(k.workers, name, stale)
    job = store.submit(short_job())
    redis_client.xreadgroup(k.group, "gone-busy", {k.stream_for("tiny"): ">"}, count=1)       # dies holding a job
    redis_client.xreadgroup(k.group, "gone-empty", {k.stream_for("tiny"): ">"}, count=1)      # nothing left to read
    time.sleep(CLAIM_IDLE_MS / 1000)
    procs.worker()
    assert final(store, job, procs)["status"] == "done"                          # reclaimed from gone-busy

    def pruned():
        names = {c["name"].decode() for c in redis_client.xinfo_consumers(k.stream_for("tiny"), k.group)}
        return not names & {"gone-empty", "gone-busy"} and not redis_client.hexists(k.workers, "gone-busy")
    wait_for(pruned, 15, "the dead workers to be pruned", procs)
    assert list(store.live_workers(HEARTBEAT_S)) and redis_client.hlen(k.workers) == 1


def test_a_redis_restart_loses_nothing_and_keeps_streams_open(checkpoint, digits_file, tmp_path):
    """Redis stopped (SIGTERM, its append-only file kept) and started again on the same port while a job
    runs and an event stream follows it: the job finishes once, the stream gets its final event."""
    from tests.test_worker_redis import Processes
    (tmp_path / "redis").mkdir()
    servers = [EmbeddedRedis(persist=True, workdir=str(tmp_path / "redis")).start()]
    procs = Processes(servers[0].url, checkpoint, tmp_path)
    r = redis.Redis.from_url(servers[0].url)
    store = JobStore(r)
    try:
        procs.worker()
        live_workers(store, 1, procs)
        job = store.submit(long_job(2500))
        running_with_progress(store, job, procs)
        settings = Settings(redis_url=servers[0].url, checkpoint=digits_file, heartbeat_s=60.0)
        with Uvicorn(settings) as api:
            async def scenario():
                stream = asyncio.create_task(_sse_until_final(api.port, f"/v1/jobs/{job}/events"))
                await asyncio.sleep(1.0)
                servers[0].stop()
                await asyncio.sleep(1.0)
                again = EmbeddedRedis(port=servers[0].port, persist=True, workdir=str(tmp_path / "redis"))
                servers.append(again.start())
                return await asyncio.wait_for(stream, 90)

            status, names = asyncio.run(scenario())
        assert status == 200 and names[-1] == "done" and "error" not in names
        rec = final(store, job, procs)
        assert (rec["status"], rec["attempts"]) == ("done", 1)
        assert events(store, job).count("done") == 1 and store.queue_depth() == 0
    finally:
        procs.close()
        r.close()
        for server in servers:
            server.stop()
