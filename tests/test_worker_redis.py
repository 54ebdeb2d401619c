"""Worker processes against a real (private) redis-server: sharing, crashes, cancel, deadline, dead letters.

Workers run as subprocesses (``python -m service.worker`` or ``eqm worker`` through ``service.cli.main``)
on a small random-weight EqM, with a short claim idle time so reclaiming takes about a second.
Every process a test starts is killed at its end, also when the test fails.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.eqm.network import EqM, EqMConfig
from service.embedded_redis import free_port
from service.images import encode_image
from service.jobstore import ImageSpec, JobSpec, JobStore, SamplerSpec

ROOT = Path(__file__).resolve().parents[1]
CLAIM_IDLE_MS = 1500
HEARTBEAT_S = 0.3
CFG = EqMConfig(arch="custom", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                num_classes=10, learn_sigma=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = EqM(CFG)
    with torch.no_grad():          # DiT init zeroes the output layer: perturb so the field is not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_safetensors(model, ModelSpec(CFG, guidance_mode="all", codec="identity"), path)
    return str(path)


class Processes:
    """Starts worker processes with their logs in files; ``close`` kills whatever is left."""

    def __init__(self, redis_url: str, checkpoint: str, logdir: Path):
        self.redis_url, self.checkpoint, self.logdir = redis_url, checkpoint, logdir
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def _common(self, capacity: int, extra: list[str]) -> list[str]:
        return ["--redis-url", self.redis_url, "--checkpoint", self.checkpoint, "--capacity", str(capacity),
                "--claim-idle-ms", str(CLAIM_IDLE_MS), "--heartbeat-s", str(HEARTBEAT_S), "--threads", "1",
                "--grace-s", "1", *extra]

    def worker(self, *extra: str, capacity: int = 4) -> subprocess.Popen:
        """One ``python -m service.worker`` process."""
        # --parent-pid: should pytest itself die, the worker stops on its own.
        return self._spawn([sys.executable, "-m", "service.worker", "--device", "cpu", "--parent-pid", str(os.getpid()),
                            *self._common(capacity, list(extra))])

    def supervisor(self, devices: str, *extra: str, capacity: int = 4) -> subprocess.Popen:
        """``eqm worker --devices ...`` (one process per device, restarted when it crashes)."""
        return self._spawn([sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
                            "worker", "--devices", devices, *self._common(capacity, list(extra))])

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        log = self.logdir / f"proc{len(self.procs)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def tail(self, lines: int = 25) -> str:
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            out.append(f"--- {log.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def close(self) -> None:
        # Supervised workers live in their own sessions: find them before their supervisor goes.
        children = [pid for proc in self.procs for pid in _children(proc.pid)]
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in children:
            _kill(pid)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def procs(redis_url, checkpoint, tmp_path):
    p = Processes(redis_url, checkpoint, tmp_path)
    yield p
    p.close()


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def wait_for(predicate, timeout: float, what: str, procs: Processes | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n" + (procs.tail() if procs else ""))


def live_workers(store: JobStore, n: int, procs: Processes, timeout: float = 40.0) -> dict[str, dict]:
    return wait_for(lambda: (lambda w: w if len(w) >= n else None)(store.live_workers(HEARTBEAT_S)),
                    timeout, f"{n} live workers", procs)


def final(store: JobStore, job_id: str, procs: Processes, timeout: float = 60.0) -> dict:
    return wait_for(lambda: (lambda j: j if j["status"] in ("done", "failed", "cancelled") else None)(store.get(job_id)),
                    timeout, f"job {job_id} to finish", procs)


def running_with_progress(store: JobStore, job_id: str, procs: Processes, attempts: int = 1) -> dict:
    def ok():
        j = store.get(job_id)
        return j if (j["status"] == "running" and j["attempts"] == attempts
                     and j["progress"][0]["steps"] > 0) else None
    return wait_for(ok, 40.0, f"job {job_id} running (attempt {attempts}) with progress", procs)


def events(store: JobStore, job_id: str) -> list[str]:
    """Every event name of the job (XRANGE: a long job has more than one XREAD page of progress)."""
    return [fields[b"event"].decode() for _, fields in store.r.xrange(store.keys.events(job_id))]


def long_job(steps: int = 1_000_000, **kw) -> JobSpec:
    kw.setdefault("images", [ImageSpec(seed=1, labels=[3]), ImageSpec(seed=2, labels=[4])])
    return JobSpec(kind="generate", model="tiny", cfg_scale=1.5, sampler=SamplerSpec(step_size=0.01, max_steps=steps), **kw)


def _two_free_ports() -> int:
    """A port P with P + 1 free too (worker i serves metrics on P + i; a taken port stops a worker)."""
    import socket
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def test_two_workers_share_the_stream(store, procs, redis_client):
    port = _two_free_ports()
    sup = procs.supervisor("cpu,cpu", "--metrics-port", str(port))
    workers = live_workers(store, 2, procs)
    assert {w["device"] for w in workers.values()} == {"cpu"}
    upload = encode_image(np.full((8, 8, 1), 180, np.uint8))
    jobs = []
    for n in range(6):
        images = [ImageSpec(seed=10 * n + i, labels=[i]) for i in range(3)]
        if n % 3 == 0:
            job = JobSpec(kind="generate", model="tiny", images=images, cfg_scale=1.5,
                          sampler=SamplerSpec(step_size=0.02, max_steps=300))
        elif n % 3 == 1:
            job = JobSpec(kind="compose", model="tiny", cfg_scale=1.0, sampler=SamplerSpec(step_size=0.02, max_steps=250),
                          images=[ImageSpec(seed=n, labels=[1, 7], weights=[0.5, 0.5]) for _ in range(2)])
        else:
            job = JobSpec(kind="denoise", model="tiny", images=images[:2], noise_level=0.6, format="webp",
                          sampler=SamplerSpec(step_size=0.02, max_steps=200))
        jobs.append(store.submit(job, input_png=upload if job.kind == "denoise" else None))
    records = [final(store, j, procs) for j in jobs]
    assert [r["status"] for r in records] == ["done"] * 6, [r["error"] for r in records]
    assert len({r["worker"] for r in records}) == 2            # both workers took jobs
    for r in records:
        assert r["attempts"] == 1
        assert len(r["images"]) == len(r["spec"]["images"])
        for img in r["images"]:
            data = store.image(r["id"], img["index"])
            assert Image.open(io.BytesIO(data)).size == (8, 8)
            assert img["content_type"] == ("image/webp" if r["spec"]["kind"] == "denoise" else "image/png")
        assert events(store, r["id"]).count("done") == 1
        assert all(p["steps"] == r["spec"]["sampler"]["max_steps"] for p in r["progress"])
    assert store.queue_depth() == 0
    assert redis_client.xpending(store.keys.stream_for("tiny"), store.keys.group)["pending"] == 0
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'eqm_images_total{model="tiny",outcome="step_cap",task=' in metrics
    assert "eqm_batch_occupancy_ratio" in metrics and "eqm_step_seconds_bucket" in metrics

    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 0
    assert store.live_workers(HEARTBEAT_S) == {}


def test_killed_worker_job_completes_once_with_the_same_images(store, procs):
    """kill -9 mid-job: a live worker reclaims it after claim_idle_ms and gives the same PNGs, once."""
    procs.worker()
    procs.worker()
    live_workers(store, 2, procs)
    reference = final(store, store.submit(long_job(3000)), procs)
    assert reference["status"] == "done"

    victim_job = store.submit(long_job(3000))
    first = running_with_progress(store, victim_job, procs)
    # Past claim_idle_ms (plus the reclaim poll) with another worker idle: the heartbeat keeps the job where it is.
    time.sleep(1.5 * CLAIM_IDLE_MS / 1000)
    still = store.get(victim_job)
    assert (still["status"], still["attempts"], still["worker"]) == ("running", 1, first["worker"]), procs.tail()
    victim_pid = store.live_workers(HEARTBEAT_S)[first["worker"]]["pid"]
    os.kill(victim_pid, signal.SIGKILL)

    done = final(store, victim_job, procs)
    assert done["status"] == "done" and done["attempts"] == 2
    assert done["worker"] != first["worker"]
    for k in range(2):
        assert store.image(victim_job, k) == store.image(reference["id"], k)          # byte-identical PNGs
    assert [i["steps"] for i in done["images"]] == [3000, 3000]
    log = events(store, victim_job)
    assert log.count("started") == 2 and log.count("done") == 1 and log.count("image") == 2
    # The replayed stream still has one norm per evaluation: the rerun repeats, and does not publish
    # again, the evaluations the first run had published.
    for k, steps in enumerate(i["steps"] for i in done["images"]):
        assert len(image_norms(store, victim_job, k)) in (steps, steps + 1)


def image_norms(store: JobStore, job_id: str, index: int) -> list[float]:
    """Image ``index``'s norms concatenated over the job's progress and image events, as a client sees them."""
    norms = []
    for _, fields in store.r.xrange(store.keys.events(job_id)):
        data = json.loads(fields[b"data"])
        if fields[b"event"] == b"progress":
            norms += next((e.get("norms", []) for e in data["images"] if e["index"] == index), [])
        elif fields[b"event"] == b"image" and data.get("index") == index:
            norms += data.get("norms", [])
    return norms


def test_cancel_reaches_the_worker_within_a_step(store, procs, redis_client):
    procs.worker()
    live_workers(store, 1, procs)
    job = store.submit(long_job())
    running_with_progress(store, job, procs)
    t0 = time.monotonic()
    assert store.cancel(job) == "running"
    rec = final(store, job, procs, timeout=10)
    assert rec["status"] == "cancelled" and time.monotonic() - t0 < 2.0
    steps_then = rec["progress"][0]["steps"]
    time.sleep(0.5)
    assert store.get(job)["progress"][0]["steps"] == steps_then          # nothing runs on
    assert redis_client.xpending(store.keys.stream_for("tiny"), store.keys.group)["pending"] == 0
    # A queued job cancelled before any worker reads it is skipped when read.
    procs.procs[0].send_signal(signal.SIGSTOP)
    try:
        queued = store.submit(long_job(10))
        assert store.cancel(queued) == "cancelled"
    finally:
        procs.procs[0].send_signal(signal.SIGCONT)
    # A bad job fails with a one-line reason; the worker goes on with the next.
    bad = store.submit(JobSpec(kind="generate", model="tiny", images=[ImageSpec(seed=1, labels=[42])]))
    ok = store.submit(long_job(20))
    assert final(store, bad, procs)["error"] == "invalid job: image 0: label 42 is out of range (classes 0..9)"
    assert final(store, ok, procs)["status"] == "done"
    assert store.get(queued)["status"] == "cancelled" and store.get(queued)["attempts"] == 0


def test_deadline_returns_flagged_images(store, procs):
    procs.worker()
    live_workers(store, 1, procs)
    job = store.submit(long_job(deadline=time.time() + 1.5))
    rec = final(store, job, procs, timeout=20)
    assert rec["status"] == "done"
    assert all(i["deadline_exceeded"] and not i["stopped_early"] and 0 < i["steps"] < 1_000_000 for i in rec["images"])
    assert all(store.image(job, i) is not None for i in range(2))


def test_dead_letter_after_repeated_crashes(store, procs, redis_client):
    """A job whose workers keep dying is delivered max_deliveries times, then dead-lettered and failed;
    the supervisor restarts each killed worker."""
    procs.supervisor("cpu", "--max-deliveries", "2")
    job = store.submit(long_job())
    pids = []
    for attempt in (1, 2):
        rec = running_with_progress(store, job, procs, attempts=attempt)
        pid = store.live_workers(HEARTBEAT_S)[rec["worker"]]["pid"]
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)
    rec = final(store, job, procs, timeout=60)
    assert rec["status"] == "failed" and rec["attempts"] == 2
    assert rec["error"] == "dead-lettered: the worker running it stopped or crashed 2 times (limit 2)"
    dead = redis_client.xrange(store.keys.deadletter)
    assert [(f[b"id"].decode(), f[b"reason"].decode()) for _, f in dead] == [(job, rec["error"])]
    assert redis_client.xpending(store.keys.stream_for("tiny"), store.keys.group)["pending"] == 0
    assert len(set(pids)) == 2
    assert len(live_workers(store, 1, procs)) >= 1                   # restarted once more and alive


def test_sigterm_hands_unfinished_jobs_back(store, procs, redis_client):
    first = procs.worker()
    live_workers(store, 1, procs)
    job = store.submit(long_job(3000))
    running_with_progress(store, job, procs)
    first.send_signal(signal.SIGTERM)                 # grace 1 s: too short for 3000 steps
    assert first.wait(timeout=20) == 0
    rec = store.get(job)
    assert rec["status"] == "queued" and store.queue_depth() == 1
    assert redis_client.xpending(store.keys.stream_for("tiny"), store.keys.group)["pending"] == 0
    assert redis_client.xlen(store.keys.stream_for("tiny")) == 1
    assert "queued" in events(store, job)[1:]
    procs.worker()
    rec = final(store, job, procs)
    assert rec["status"] == "done" and rec["attempts"] == 2
    assert [i["steps"] for i in rec["images"]] == [3000, 3000]


def test_a_bad_checkpoint_stops_the_supervisor_instead_of_restarting(procs, tmp_path):
    procs.checkpoint = str(tmp_path / "missing.safetensors")
    sup = procs.supervisor("cpu")
    assert sup.wait(timeout=60) == 2
    assert "missing.safetensors: no such file" in procs.tail()
