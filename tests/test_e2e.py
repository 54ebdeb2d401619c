"""End to end: `eqm serve` (real uvicorn, real worker process on the CPU with the bundled digits model)
against a real Redis, driven over HTTP like a client would. Started once for the module.

Also: `eqm serve` with its embedded Redis stops everything on Ctrl-C, `eqm api` without a worker
answers 503, and a schemathesis run over the OpenAPI schema finds no server error.
"""
from __future__ import annotations

import io
import json
import math
import os
import signal
import socket
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models import resolve_checkpoint
from service.embedded_redis import free_port
from service.jobstore import JobStore
from tests.clientstack import service_env as _env, start as _start, stop as _stop, wait_ready as _wait_for

API_KEY = "e2e-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECKPOINT = "digits"

pytestmark = pytest.mark.skipif(not resolve_checkpoint(CHECKPOINT).is_file(),
                                reason="the bundled digits model (models/weights/digits.safetensors) is missing")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- `eqm serve` on its own: embedded Redis, clean Ctrl-C ------------------------------------------

def test_serve_embedded_starts_and_stops_cleanly(tmp_path):
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    proc = _start(["serve", "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu", "--threads", "1"],
                  _env(EQM_CHECKPOINT=CHECKPOINT, EQM_HEARTBEAT_S="0.5"), log)
    waiter = follower = None
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/readyz", proc, log)
        redis_port = int(log.read_text().split("embedded Redis on redis://127.0.0.1:")[1].split("/")[0])
        registry = redis.Redis(port=redis_port).hgetall("eqm:workers")
        worker_pid = int(json.loads(next(iter(registry.values())))["pid"])
        resp = httpx.post(f"{base}/v1/generations?wait=true", json={"labels": [4], "max_steps": 10}, timeout=60)
        assert resp.status_code == 200 and resp.json()["status"] == "done", resp.text
        assert _port_open(redis_port) and _pid_alive(worker_pid) and _port_open(metrics_port)

        # Ctrl-C while a client waits on a long job (?wait=true) and another follows its events.
        long_job = {"labels": [2], "n": 32, "max_steps": 1000, "grad_norm_threshold": 0}   # runs for seconds
        answers: dict[str, object] = {}

        def wait_for_job():
            answers["wait"] = httpx.post(f"{base}/v1/generations?wait=true", json=long_job, timeout=60)

        waiter = threading.Thread(target=wait_for_job)
        waiter.start()
        job_id = None
        end = time.monotonic() + 30
        while job_id is None and time.monotonic() < end:     # the waiting request's job, once it runs
            time.sleep(0.1)
            r = redis.Redis(port=redis_port)
            running = [k.decode().split(":")[-1] for k in r.scan_iter("eqm:job:*")
                       if k.count(b":") == 2 and r.hget(k, "status") == b"running"]
            r.close()
            job_id = running[0] if running else None
        assert job_id, "the long job never started"

        following = threading.Event()

        def follow():
            names = []
            with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=60) as stream:
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        names.append(line[7:])
                        following.set()
            answers["events"] = names

        follower = threading.Thread(target=follow)
        follower.start()
        assert following.wait(30), "the event stream never started"
    finally:
        code = _stop(proc, signal.SIGINT)                  # what Ctrl-C sends
    for thread in (waiter, follower):
        if thread is not None:
            thread.join(timeout=30)
    assert code == 0, log.read_text()[-3000:]
    wait = answers["wait"]
    assert wait.status_code == 202 and wait.headers["content-type"] == "application/json", wait.text
    assert wait.json()["id"] == job_id and wait.json()["status"] in ("queued", "running"), wait.text
    assert answers["events"][0] == "queued" and answers["events"][-1] == "stopping", answers["events"]
    assert not _port_open(port) and not _port_open(redis_port) and not _port_open(metrics_port)
    assert not _pid_alive(worker_pid)
    assert "Traceback" not in log.read_text()


def test_api_command_without_worker_answers_503(redis_server, tmp_path):
    port = free_port()
    log = tmp_path / "api.log"
    proc = _start(["api", "--port", str(port)],
                  _env(EQM_REDIS_URL=redis_server.url, EQM_KEY_PREFIX=f"lonely{uuid.uuid4().hex[:6]}",
                       EQM_CHECKPOINT=CHECKPOINT), log)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/healthz", proc, log)
        resp = httpx.post(f"{base}/v1/generations", json={"labels": [1]})
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) > 0
        assert "no live worker" in resp.json()["detail"]
        assert httpx.get(f"{base}/readyz").status_code == 503
    finally:
        assert _stop(proc) == 0


# -- the full stack -----------------------------------------------------------------------------

@dataclass
class Stack:
    base_url: str
    metrics_url: str
    redis: redis.Redis
    store: JobStore
    client: httpx.Client


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    port, metrics_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("e2e") / "serve.log"
    env = _env(EQM_REDIS_URL=redis_server.url, EQM_KEY_PREFIX=prefix, EQM_CHECKPOINT=CHECKPOINT,
               EQM_API_KEYS=API_KEY, EQM_MAX_UPLOAD_BYTES="200000", EQM_MAX_UPLOAD_PIXELS="1000000",
               EQM_MAX_IMAGES_PER_JOB="8", EQM_MAX_QUEUE="10", EQM_CAPACITY="16", EQM_HEARTBEAT_S="0.5",
               EQM_WAIT_TIMEOUT_S="60")
    proc = _start(["serve", "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu",
                   "--threads", "1", "--log-level", "warning"], env, log)
    base = f"http://127.0.0.1:{port}"
    r = redis.Redis.from_url(redis_server.url)
    client = httpx.Client(base_url=base, headers=AUTH, timeout=90)
    try:
        _wait_for(f"{base}/readyz", proc, log)
        yield Stack(base, f"http://127.0.0.1:{metrics_port}/metrics", r, JobStore(r, prefix), client)
    finally:
        store = JobStore(r, prefix)
        for key in r.scan_iter(f"{prefix}:job:*"):     # cancel what fuzzing left running: a quick stop
            parts = key.decode().split(":")
            if len(parts) == 3:
                store.cancel(parts[2])
        client.close()
        code = _stop(proc)
        r.close()
        assert code == 0, log.read_text()[-3000:]


def _image(stack: Stack, url: str, content_type: str = "image/png") -> Image.Image:
    resp = stack.client.get(url)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == content_type
    image = Image.open(io.BytesIO(resp.content))
    image.load()
    return image


def _check_done(stack: Stack, job: dict, count: int, max_steps: int, content_type: str = "image/png") -> None:
    assert job["status"] == "done", job
    assert len(job["images"]) == count
    for img in job["images"]:
        assert img["ready"] and 1 <= img["steps"] <= max_steps
        assert img["grad_norm"] is not None and math.isfinite(img["grad_norm"])
        image = _image(stack, img["url"], content_type)
        assert image.size == (8, 8)
        assert image.mode == ("RGB" if content_type == "image/webp" else "L")     # WebP has no grey mode


def test_generations(stack):
    resp = stack.client.post("/v1/generations?wait=true", json={"labels": [0, "7"], "n": 2, "seed": 0, "max_steps": 40})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    _check_done(stack, job, 4, 40)
    assert [(i["labels"], i["seed"]) for i in job["images"]] == [([0], 0), ([0], 1), ([7], 2), ([7], 3)]
    assert job["timings"]["total_s"] > 0 and job["worker"]


@pytest.mark.parametrize("fmt,content_type", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_output_formats(stack, fmt, content_type):
    resp = stack.client.post("/v1/generations?wait=true", json={"labels": [5], "max_steps": 20, "format": fmt})
    assert resp.status_code == 200, resp.text
    _check_done(stack, resp.json(), 1, 20, content_type)


def test_compositions(stack):
    resp = stack.client.post("/v1/compositions?wait=true",
                             json={"labels": [1, "7"], "weights": [0.5, 0.5], "n": 2, "seed": 3, "max_steps": 40})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    _check_done(stack, job, 2, 40)
    assert job["kind"] == "compose" and job["images"][0]["labels"] == [1, 7]


def test_denoise(stack):
    image = Image.new("L", (32, 32), 0)
    image.paste(255, (14, 4, 18, 28))                    # a vertical stroke: a rough "1"
    buf = io.BytesIO()
    image.save(buf, "PNG")
    resp = stack.client.post("/v1/denoise?wait=true", data={"label": "1", "noise_level": "0.5", "n": "2",
                                                            "max_steps": "30"},
                             files={"image": ("one.png", buf.getvalue(), "image/png")})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    _check_done(stack, job, 2, 30)
    assert job["kind"] == "denoise" and job["noise_level"] == 0.5
    stored = Image.open(io.BytesIO(stack.redis.get(stack.store.keys.input(job["id"]))))
    assert stored.size == (8, 8) and stored.mode == "L"


def _events(stack: Stack, url: str, timeout_s: float = 60) -> list[tuple[str, dict]]:
    out, event = [], None
    with stack.client.stream("GET", url, timeout=timeout_s) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
    return out


def test_events_show_progress(stack):
    # threshold 0: every image runs its 1000 updates, long enough for progress events (every 0.3 s)
    resp = stack.client.post("/v1/generations", json={"labels": [2], "n": 2, "max_steps": 1000,
                                                      "grad_norm_threshold": 0})
    assert resp.status_code == 202, resp.text
    events = _events(stack, resp.json()["links"]["events"])
    names = [name for name, _ in events]
    assert names[0] == "queued" and "started" in names and names[-1] == "done"
    assert names.count("image") == 2
    progress = [data["images"] for name, data in events if name == "progress"]
    assert progress, names
    steps = [max(i["steps"] for i in images) for images in progress]
    assert steps == sorted(steps) and 0 < steps[-1] <= 1000
    assert all(i["grad_norm"] is None or i["grad_norm"] >= 0 for images in progress for i in images)
    finals = [data for name, data in events if name == "image"]
    assert all(d["steps"] == 1000 and not d["stopped_early"] for d in finals)


def test_cancel_running_job(stack):
    resp = stack.client.post("/v1/generations", json={"labels": [3], "n": 4, "max_steps": 1000,
                                                      "grad_norm_threshold": 0})
    job_url = resp.json()["links"]["self"]
    end = time.monotonic() + 30
    while stack.client.get(job_url).json()["status"] != "running":
        assert time.monotonic() < end, "the job never started"
        time.sleep(0.05)
    cancel = stack.client.delete(job_url)
    assert cancel.status_code == 202 and cancel.json()["cancel_requested"], cancel.text
    names = [name for name, _ in _events(stack, resp.json()["links"]["events"])]
    assert names[-1] == "cancelled"
    job = stack.client.get(job_url).json()
    assert job["status"] == "cancelled" and job["cancel_requested"]
    assert max(i["steps"] for i in job["images"]) < 1000
    assert stack.client.get(job["images"][0]["url"]).status_code == 404
    assert stack.client.delete(job_url).json()["status"] == "cancelled"


def _sample_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_move(stack):
    before = httpx.get(stack.metrics_url).text
    resp = stack.client.post("/v1/generations?wait=true", json={"labels": [6], "n": 3, "max_steps": 25,
                                                                "grad_norm_threshold": 0})
    assert resp.status_code == 200, resp.text
    after = httpx.get(stack.metrics_url).text
    labels = {"model": "digits", "task": "generate"}
    assert _sample_value(after, "eqm_steps_per_sample_count", **labels) == \
        _sample_value(before, "eqm_steps_per_sample_count", **labels) + 3
    assert _sample_value(after, "eqm_steps_per_sample_sum", **labels) == \
        _sample_value(before, "eqm_steps_per_sample_sum", **labels) + 75
    assert _sample_value(after, "eqm_steps_per_sample_bucket", le="35.0", **labels) >= 3
    api = stack.client.get("/metrics").text
    assert _sample_value(api, "eqm_api_jobs_submitted_total", kind="generate") >= 1
    assert "eqm_queue_depth" in api and _sample_value(api, "eqm_live_workers", model="digits") == 1
    # The API's page includes the worker's series, so discovery lists no worker (no series counted twice);
    # the worker label is its endpoint's host:port, the same at every restart.
    assert stack.client.get("/sd/workers").json() == []
    endpoint = stack.metrics_url.split("//")[1].split("/")[0]
    assert _sample_value(api, "eqm_worker_metrics_up", worker=endpoint) == 1


def _png_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    raw = buf.getvalue()
    chunk = b"IHDR" + struct.pack(">II", width, height) + raw[24:29]
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def test_bad_inputs_get_their_status(stack):
    c, store = stack.client, stack.store
    jobs_before = len(list(stack.redis.scan_iter(f"{store.keys.prefix}:job:*")))
    png = io.BytesIO()
    Image.new("L", (16, 16)).save(png, "PNG")
    cases = [
        (httpx.post(f"{stack.base_url}/v1/generations", json={"labels": [1]}), 401),
        (c.post("/v1/generations", json={"labels": [10]}), 422),
        (c.post("/v1/generations", json={"labels": ["nine"]}), 422),
        (c.post("/v1/generations", json={"guidance_scale": 99}), 422),
        (c.post("/v1/generations", json={"max_steps": 100_000}), 422),
        (c.post("/v1/generations", json={"n": 9}), 422),
        (c.post("/v1/compositions", json={"labels": [1], "n": 1}), 422),
        (c.post("/v1/denoise", data={"noise_level": "2"}, files={"image": ("a.png", png.getvalue(), "image/png")}), 422),
        (c.post("/v1/denoise", files={"image": ("big.png", b"\x89PNG\r\n\x1a\n" + os.urandom(250_000), "image/png")}), 413),
        (c.post("/v1/denoise", files={"image": ("bomb.png", _png_claiming(50_000, 50_000), "image/png")}), 413),
        (c.post("/v1/denoise", files={"image": ("notes.txt", b"just text", "text/plain")}), 415),
        (c.get("/v1/jobs/0000deadbeef"), 404),
        (c.get("/v1/jobs/0000deadbeef/images/0"), 404),
        (c.get("/v1/jobs/0000deadbeef/events"), 404),
        (c.delete("/v1/jobs/0000deadbeef"), 404),
    ]
    for i, (resp, status) in enumerate(cases):
        assert resp.status_code == status, (i, resp.status_code, resp.text)
        assert resp.json()["detail"]
    assert len(list(stack.redis.scan_iter(f"{store.keys.prefix}:job:*"))) == jobs_before

    # 429: fill the queue up to EQM_MAX_QUEUE with placeholders, as a burst of clients would
    fillers = [f"filler{i}" for i in range(10)]
    stack.redis.sadd(store.keys.queued_for("digits"), *fillers)       # admission counts the model's queue
    try:
        resp = c.post("/v1/generations", json={"labels": [1]})
        assert resp.status_code == 429 and int(resp.headers["retry-after"]) > 0, resp.text
    finally:
        stack.redis.srem(store.keys.queued_for("digits"), *fillers)


def test_openapi_schema_validates(stack):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(httpx.get(f"{stack.base_url}/openapi.json").json())


# -- fuzzing: schemathesis over every operation (last: it leaves jobs behind) ---------------------
# Schemathesis' Python API with Hypothesis' ``given``, not its pytest plugin: the plugin reaches into
# pytest's private node attributes, which change between pytest releases.

FUZZ_EXAMPLES = 40          # per operation and generation mode


def test_fuzz_no_server_errors(stack):
    """Valid and invalid requests to every operation: no 5xx, and every answer matches the schema
    (documented status code, content type and body); schema-violating requests are refused."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     response_schema_conformance, status_code_conformance)

    # The live schema, minus ``?wait`` (a long poll, exercised above): keeps the run bounded in time.
    raw = httpx.get(f"{stack.base_url}/openapi.json").json()
    for path in raw["paths"].values():
        for operation in path.values():
            operation["parameters"] = [p for p in operation.get("parameters", []) if p["name"] != "wait"]
    schema = schemathesis.openapi.from_dict(raw)
    @schemathesis.check
    def json_negative_data_rejection(ctx, response, case):
        # A schema violation drawn in a query string or a multipart form can serialize away (an empty list
        # is no field at all, a value with no characters no parameter), so the server gets a valid request;
        # JSON bodies carry every violation as drawn. The multipart routes' bad input: test_multipart_fuzz.
        if case.media_type == "application/json":
            return negative_data_rejection(ctx, response, case)
        return None

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              json_negative_data_rejection]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    fuzzed = {(op.method.upper(), op.path) for op in operations}     # the multipart routes too (and test_multipart_fuzz)
    assert {("POST", p) for p in ("/v1/scores", "/v1/inpaint", "/v1/denoise", "/v1/images/edits")} <= fuzzed
    for operation in operations:
        cases = st.one_of(operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
                          operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))

        @given(case=cases)
        # derandomize: the same cases every run (a fixed seed per operation), so a failure is the code's, not the draw's
        @settings(max_examples=2 * FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)
        def fuzz(case):
            case.call_and_validate(base_url=stack.base_url, headers=AUTH, timeout=30, checks=checks)

        fuzz()
