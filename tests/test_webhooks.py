"""Webhooks end to end: a real `eqm serve` POSTs a job's events to a real HTTP receiver on loopback.

Signatures are checked with `standardwebhooks`, the reference implementation of the spec (not ours).
A receiver that is down for 10 s still gets every event once it is back, across an API restart.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient

from clientstack import serve, stop
from models import resolve_checkpoint
from service.api import create_app
from service.embedded_redis import free_port
from service.settings import Settings
from service.webhooks import host_allowed, sign, signing_key

standardwebhooks = pytest.importorskip("standardwebhooks")
pytestmark = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(), reason="the bundled digits model is missing")
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Receiver:
    """A webhook receiver on a fixed loopback port that can go down and come back; it answers ``status``
    to every delivery after ``delay_s`` and records each one with its arrival time (``arrived``)."""

    def __init__(self, port: int, status: int = 204, delay_s: float = 0.0):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.status, self.delay_s = status, delay_s
        self.received: list[tuple[dict, bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    def up(self) -> "Receiver":
        received, status, delay_s = self.received, self.status, self.delay_s

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                headers = {k.lower(): v for k, v in self.headers.items()}
                headers["arrived"] = time.monotonic()
                received.append((headers, self.rfile.read(int(self.headers["content-length"]))))
                time.sleep(delay_s)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self, job_id: str) -> dict[str, dict]:
        """Verified deliveries of one job by webhook-id (duplicates of an id are the same message)."""
        verifier = standardwebhooks.Webhook(SECRET)
        out = {}
        for headers, body in list(self.received):
            payload = verifier.verify(body, headers)          # raises unless the signature is right
            if payload["data"]["id"] == job_id:
                out[headers["webhook-id"]] = payload
        return out


def _wait_for(predicate, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _settings(prefix: str) -> dict[str, str]:
    return dict(EQM_KEY_PREFIX=prefix, EQM_WEBHOOK_SECRET=SECRET, EQM_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
                EQM_WEBHOOK_MAX_BACKOFF_S="1", EQM_WAIT_TIMEOUT_S="60")


def test_signing_matches_the_reference_implementation():
    key = signing_key(SECRET)
    body = json.dumps({"type": "job.completed", "data": {"id": "x"}})
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": sign(key, "msg_1", now, body)}
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == json.loads(body)
    assert standardwebhooks.Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(now, timezone.utc), body) \
        == headers["webhook-signature"]
    with pytest.raises(ValueError):
        signing_key("whsec_not base64!")
    assert host_allowed("http://127.0.0.1:9/x", ("127.0.0.1",)) and host_allowed("http://a.b:81/", ("a.b:81",))
    assert not host_allowed("http://a.b:82/", ("a.b:81",)) and not host_allowed("http://10.0.0.1/", ())


def test_events_are_signed_and_filtered(redis_server, tmp_path):
    port = free_port()
    receiver = Receiver(free_port()).up()
    proc = serve(redis_server.url, port, tmp_path / "serve.log", **_settings(f"wh{uuid.uuid4().hex[:8]}"))
    api = f"http://127.0.0.1:{port}"
    try:
        # 1000 updates without early stop: long enough for progress events
        job = httpx.post(f"{api}/v1/generations?wait=true", timeout=90, json={
            "labels": [3], "n": 2, "max_steps": 1000, "grad_norm_threshold": 0, "webhook": receiver.url}).json()
        assert job["status"] == "done", job
        got = _wait_for(lambda: (lambda e: e if any(p["type"] == "job.completed" for p in e.values()) else None)(
            receiver.events(job["id"])), 30, "the completed event")
        types = [p["type"] for p in sorted(got.values(), key=lambda p: p["timestamp"])]
        assert types.count("job.start") == 1 and types.count("job.image") == 2 and types.count("job.completed") == 1
        progress = sorted(p["data"]["time"] for p in got.values() if p["type"] == "job.progress")
        assert progress and all(b - a >= 0.5 for a, b in zip(progress, progress[1:]))     # at most 2 per second
        done = next(p for p in got.values() if p["type"] == "job.completed")["data"]
        assert done["status"] == "done" and done["urls"][1] == f"{api}/v1/jobs/{job['id']}/images/1"
        assert httpx.get(done["urls"][0]).status_code == 200

        only_done = httpx.post(f"{api}/v1/generations?wait=true", timeout=90, json={
            "labels": [1], "max_steps": 10, "webhook": receiver.url, "webhook_events_filter": ["completed"]}).json()
        got = _wait_for(lambda: receiver.events(only_done["id"]), 30, "the filtered event")
        time.sleep(1.0)
        assert [p["type"] for p in receiver.events(only_done["id"]).values()] == ["job.completed"]

        refused = httpx.post(f"{api}/v1/generations", json={"labels": [1], "webhook": "http://169.254.169.254/x"})
        assert refused.status_code == 422 and "not allowed" in refused.json()["message"]
        bad = httpx.post(f"{api}/v1/generations", json={"labels": [1], "webhook": "ftp://127.0.0.1/x"})
        assert bad.status_code == 422
    finally:
        receiver.down()
        assert stop(proc) == 0


def test_receiver_down_and_api_restart_lose_nothing(redis_server, tmp_path):
    port = free_port()
    receiver = Receiver(free_port())                       # not listening yet
    settings = _settings(f"wh{uuid.uuid4().hex[:8]}")
    log = tmp_path / "serve.log"
    proc = serve(redis_server.url, port, log, **settings)
    api = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        job = httpx.post(f"{api}/v1/generations?wait=true", timeout=90, json={
            "labels": [7], "n": 3, "max_steps": 30, "webhook": receiver.url,
            "webhook_events_filter": ["start", "image", "completed"]}).json()
        assert job["status"] == "done", job
        time.sleep(1.5)                                    # a few failed attempts while the receiver is down
        assert stop(proc) == 0                             # the API (and worker) restart in between
        proc = serve(redis_server.url, port, log, **settings)
        time.sleep(max(0.0, 10.0 - (time.monotonic() - t0)))
        assert not receiver.received
        receiver.up()
        got = _wait_for(lambda: (lambda e: e if len(e) >= 5 else None)(receiver.events(job["id"])), 30,
                        "every event after the receiver came back")
        types = sorted(p["type"] for p in got.values())
        assert types == ["job.completed", "job.image", "job.image", "job.image", "job.start"]
        images = [p["data"] for p in got.values() if p["type"] == "job.image"]
        assert sorted(d["index"] for d in images) == [0, 1, 2]
        assert {d["url"] for d in images} == {f"{api}/v1/jobs/{job['id']}/images/{k}" for k in range(3)}
    finally:
        receiver.down()
        stop(proc)


def test_webhooks_off_without_a_secret(redis_url):
    with TestClient(create_app(Settings(redis_url=redis_url, webhook_allowed_hosts=("127.0.0.1",)))) as client:
        resp = client.post("/v1/generations", json={"labels": [1], "webhook": "http://127.0.0.1:9/hook"})
        assert resp.status_code == 422 and "EQM_WEBHOOK_SECRET" in resp.json()["message"]
        resp = client.post("/v1/generations", json={"labels": [1], "webhook_events_filter": ["start"]})
        assert resp.status_code == 422 and "needs a webhook" in resp.json()["message"]


def _cancelled_job_with_hook(redis_client, url: str) -> str:
    """A job followed for ``completed`` and cancelled while queued (its final event), by hand."""
    from service.jobstore import ImageSpec, JobSpec, JobStore
    from service.webhooks import WebhookTarget, register_webhook

    store = JobStore(redis_client)
    spec = JobSpec(kind="generate", model="digits", images=[ImageSpec(seed=0, labels=[1])])
    register_webhook(redis_client, "eqm", spec.id, WebhookTarget(url, ("completed",)), "http://api", 60)
    store.submit(spec)
    store.cancel(spec.id)
    return spec.id


def test_retries_back_off_then_give_up(redis_client):
    """The dispatcher driven by hand: a 5xx is retried after a growing pause, and dropped after the window."""
    from service.webhooks import HookKeys, WebhookDispatcher

    receiver = Receiver(free_port(), status=500).up()
    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1",), webhook_retry_window_s=2.0,
                        webhook_max_backoff_s=0.6)
    keys = HookKeys("eqm")
    job_id = _cancelled_job_with_hook(redis_client, receiver.url)
    dispatcher = WebhookDispatcher(redis_client, settings)
    try:
        assert dispatcher.collect()
        assert not redis_client.sismember(keys.follow, job_id)         # final: no longer followed
        (mid,) = [m.decode() for m in redis_client.zrange(keys.due, 0, -1)]
        end = time.monotonic() + 10
        while redis_client.exists(keys.msg(mid)) and time.monotonic() < end:
            dispatcher.deliver_due()
            time.sleep(0.02)
        assert not redis_client.exists(keys.msg(mid)) and not redis_client.zscore(keys.due, mid)   # given up
        attempts = [json.loads(body)["data"]["status"] for _, body in receiver.received]
        assert attempts[0] == "cancelled" and 4 <= len(attempts) <= 8                 # 0.5 s, 0.6 s, 0.6 s ... for 2 s
        ids = {h["webhook-id"] for h, _ in receiver.received}
        assert ids == {mid}                                                            # one message, retried
        arrived = [h["arrived"] for h, _ in receiver.received]
        gaps = [b - a for a, b in zip(arrived, arrived[1:])]
        assert gaps[0] >= 0.45 and all(g >= 0.55 for g in gaps[1:])                  # 0.5 s, then the 0.6 s cap
    finally:
        receiver.down()
        dispatcher.stop()


def test_a_slow_receiver_holds_up_only_its_own_job(redis_client):
    """Deliveries to different jobs run side by side: a receiver that takes 3 s to answer does not delay
    another job's delivery listed after it."""
    from service.webhooks import HookKeys, WebhookDispatcher

    slow = Receiver(free_port(), delay_s=3.0).up()
    fast = Receiver(free_port()).up()
    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1",))
    keys = HookKeys("eqm")
    slow_job = _cancelled_job_with_hook(redis_client, slow.url)
    fast_job = _cancelled_job_with_hook(redis_client, fast.url)
    dispatcher = WebhookDispatcher(redis_client, settings)
    try:
        assert dispatcher.collect()
        listed = [m.decode() for m in redis_client.zrange(keys.due, 0, -1)]
        mids = {json.loads(redis_client.hget(keys.msg(m), "body"))["data"]["id"]: m for m in listed}
        redis_client.zadd(keys.due, {mids[slow_job]: 1, mids[fast_job]: 2})        # the slow one is listed first
        t0 = time.monotonic()
        assert dispatcher.deliver_due()
        _wait_for(lambda: fast.received, 10, "the fast receiver's delivery")
        assert fast.received[0][0]["arrived"] - t0 < 2.0 and slow.received           # not after the slow 3 s
        assert dispatcher.wait_idle(10)
        for job_id, receiver in ((slow_job, slow), (fast_job, fast)):
            assert [json.loads(b)["data"]["id"] for _, b in receiver.received] == [job_id]
            assert not redis_client.exists(keys.msg(mids[job_id]))                   # delivered: done
        assert redis_client.zcard(keys.due) == 0
    finally:
        slow.down()
        fast.down()
        dispatcher.stop()


def test_a_url_with_a_control_character_is_refused_at_submission(redis_url):
    """``urlsplit`` drops tabs and newlines, so the host check alone passes such a URL; the sender's own
    parser refuses it, and so does the submission (422), instead of a delivery that can never be sent."""
    settings = Settings(redis_url=redis_url, webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1:9000",))
    with TestClient(create_app(settings)) as client:
        for url in ("http://127.0.0.1:9000/poison\n", "http://127.0.0.1:9000/a\tb", "http://127.0.0.1:9000/\r"):
            resp = client.post("/v1/generations", json={"labels": [1], "webhook": url})
            assert resp.status_code == 422, resp.text
            assert "control characters" in resp.json()["message"]


def test_a_poisoned_delivery_is_dropped_not_retried(redis_client, caplog):
    """A delivery record whose URL httpx cannot send (written before submissions were checked) is final
    at its first attempt: dropped with one warning, not rescheduled forever."""
    from service.webhooks import HookKeys, WebhookDispatcher

    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1:9000",))
    keys = HookKeys("eqm")
    mids = []
    for k, url in enumerate(("http://127.0.0.1:9000/poison\n", "http://127.0.0.1:9000/a b\x00")):
        mid = f"job{k}-1-0"
        redis_client.hset(keys.msg(mid), mapping={"url": url, "body": "{}", "first": time.time(), "attempts": 0})
        redis_client.zadd(keys.due, {mid: 0})
        mids.append(mid)
    dispatcher = WebhookDispatcher(redis_client, settings)
    try:
        with caplog.at_level("WARNING", logger="eqm.webhooks"):
            assert dispatcher.deliver_due()
            assert dispatcher.wait_idle(10)
        for mid in mids:
            assert not redis_client.exists(keys.msg(mid)) and redis_client.zscore(keys.due, mid) is None
        assert not any(r.exc_info for r in caplog.records)                     # no traceback
        assert sum("dropped" in r.getMessage() for r in caplog.records) == 2
        assert not dispatcher.deliver_due()                                    # nothing left to attempt
    finally:
        dispatcher.stop()


def test_a_hook_registered_before_its_job_exists_is_not_dropped(redis_client):
    """The hook is written before the job record; a dispatcher pass in that gap must keep following the
    job, so its events are delivered once the record and its events appear."""
    from service.jobstore import ImageSpec, JobSpec, JobStore
    from service.webhooks import HookKeys, WebhookDispatcher, WebhookTarget, register_webhook

    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1",))
    keys = HookKeys("eqm")
    store = JobStore(redis_client)
    spec = JobSpec(kind="generate", model="digits", images=[ImageSpec(seed=0, labels=[1])])
    register_webhook(redis_client, "eqm", spec.id, WebhookTarget("http://127.0.0.1:9/hook", ("completed",)),
                     "http://api", 60)
    dispatcher = WebhookDispatcher(redis_client, settings)
    try:
        assert not dispatcher.collect()                         # a pass in the gap: no job record yet
        assert redis_client.sismember(keys.follow, spec.id)     # still followed
        store.submit(spec)
        store.cancel(spec.id)
        assert dispatcher.collect()
        bodies = [json.loads(redis_client.hget(keys.msg(m.decode()), "body")) for m in redis_client.zrange(keys.due, 0, -1)]
        assert [(b["data"]["id"], b["type"]) for b in bodies] == [(spec.id, "job.completed")]
    finally:
        dispatcher.stop()


def test_a_refused_submission_leaves_no_hook_behind(redis_url, redis_client):
    """A submission refused after its webhook was registered (no worker: 503) stops following the job."""
    from service.webhooks import HookKeys

    settings = Settings(redis_url=redis_url, webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1",))
    with TestClient(create_app(settings)) as client:
        resp = client.post("/v1/generations", json={"labels": [1], "webhook": "http://127.0.0.1:9/hook"})
    assert resp.status_code == 503, resp.text
    assert redis_client.scard(HookKeys("eqm").follow) == 0


class HangingReceiver:
    """A receiver that accepts connections and reads requests but answers none until ``release()``;
    ``in_flight`` is how many requests it holds now, ``most_at_once`` the largest that ever was."""

    def __init__(self):
        self.release_event = threading.Event()
        self.in_flight = self.most_at_once = self.requests = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["content-length"]))
                with outer._lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.most_at_once = max(outer.most_at_once, outer.in_flight)
                outer.release_event.wait(30)
                with outer._lock:
                    outer.in_flight -= 1
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:                 # the sender gave up (its timeout) and closed
                    pass

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release_event.set()
        self._server.shutdown()
        self._server.server_close()


def test_a_hung_receiver_delays_no_other_receivers_deliveries(redis_client):
    """30 jobs whose receiver never answers, listed before 10 jobs of a healthy receiver: the healthy one
    gets all 10 while the hung one still holds its first attempts (before any could time out), and the
    hung receiver never holds more than its own slots."""
    from service.webhooks import DELIVERY_TIMEOUT_S, HookKeys, WebhookDispatcher

    hung, healthy = HangingReceiver(), Receiver(free_port()).up()
    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1",))
    keys = HookKeys("eqm")
    hung_jobs = [_cancelled_job_with_hook(redis_client, hung.url) for _ in range(30)]
    healthy_jobs = [_cancelled_job_with_hook(redis_client, healthy.url) for _ in range(10)]
    dispatcher = WebhookDispatcher(redis_client, settings)
    try:
        assert dispatcher.collect()
        by_job = {json.loads(redis_client.hget(keys.msg(m.decode()), "body"))["data"]["id"]: m
                  for m in redis_client.zrange(keys.due, 0, -1)}
        redis_client.zadd(keys.due, {by_job[j]: 1 + k for k, j in enumerate(hung_jobs + healthy_jobs)})
        t0 = time.monotonic()
        dispatcher.start()
        _wait_for(lambda: len(healthy.received) == 10, DELIVERY_TIMEOUT_S - 1, "the healthy receiver's 10 deliveries")
        assert time.monotonic() - t0 < DELIVERY_TIMEOUT_S and hung.requests >= 1    # hung attempts still open
        assert {json.loads(b)["data"]["id"] for _, b in healthy.received} == set(healthy_jobs)
        assert hung.most_at_once <= 2                   # the README's slots per receiver
    finally:
        dispatcher.stop()
        hung.close()
        healthy.down()


def test_410_gone_ends_the_hook_without_retries(redis_client):
    """A receiver that answers 410 Gone to a job's first delivery gets nothing more of that job: its
    other pending deliveries and its hook are dropped, and a later event is not collected."""
    from service.jobstore import ImageSpec, JobSpec, JobStore
    from service.webhooks import EVENTS, HookKeys, WebhookDispatcher, WebhookTarget, register_webhook

    gone = Receiver(free_port(), status=410).up()
    keys, store = HookKeys("eqm"), JobStore(redis_client)
    spec = JobSpec(kind="generate", model="digits", images=[ImageSpec(seed=0, labels=[1])])
    register_webhook(redis_client, "eqm", spec.id, WebhookTarget(gone.url, EVENTS), "http://api", 60)
    store.submit(spec)
    store.publish(spec.id, "started", {"id": spec.id, "time": time.time()})
    store.publish(spec.id, "progress", {"id": spec.id, "time": time.time(), "images": []})
    dispatcher = WebhookDispatcher(redis_client, Settings(webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1",)))
    try:
        assert dispatcher.collect()
        assert redis_client.zcard(keys.due) == 2                     # started and progress
        assert dispatcher.deliver_due() and dispatcher.wait_idle(10)
        store.cancel(spec.id)                                        # a later event: not followed any more
        dispatcher.collect()
        for _ in range(20):
            dispatcher.deliver_due()
            time.sleep(0.05)
        assert dispatcher.wait_idle(10)
        assert len(gone.received) == 1                               # the first delivery only, never retried
        assert redis_client.zcard(keys.due) == 0 and not redis_client.keys("eqm:hooks:msg:*")
        assert not redis_client.exists(keys.hook(spec.id)) and not redis_client.sismember(keys.follow, spec.id)
    finally:
        dispatcher.stop()
        gone.down()
