"""Webhooks: a job's events POSTed to a URL, signed per the Standard Webhooks spec, delivered at least once.

A job submitted with ``webhook`` (and optionally ``webhook_events_filter``) is *followed*: its record
``P:hook:<id>`` holds the URL, the events wanted and a cursor into the job's event stream
(``P:job:<id>:events``, the same stream server-sent events replay). The dispatcher

1. **collects**: for every followed job, reads the events after its cursor, turns each wanted one into
   a delivery ``P:hooks:msg:<mid>`` due now (``P:hooks:due``), and moves the cursor, in one MULTI.
   Progress is throttled to one event per 0.5 s of the job's own clock (at most 2 per second).
   The job is no longer followed after its final event (``completed``);
2. **delivers** due messages, up to ``DELIVERY_WORKERS`` jobs at once and at most
   ``PER_RECEIVER`` of them to one receiver (``scheme://host:port``); one job's messages go in order,
   one after another, and a failed attempt ends its job's turn (the later ones wait for it). So a hung
   or slow receiver spends only its own slots and time: others' deliveries are neither queued behind
   it nor starved of connections. ``POST url`` with headers ``webhook-id`` (stable across retries, so the
   receiver can drop duplicates), ``webhook-timestamp`` (unix seconds of this attempt) and
   ``webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`` where the key is the
   base64 part of ``EQM_WEBHOOK_SECRET`` (``whsec_<base64>``). A 2xx answer ends the delivery; anything
   else (refused connection, timeout, non-2xx, redirects are not followed) schedules another attempt
   after ``min(0.5 s * 2^attempts, EQM_WEBHOOK_MAX_BACKOFF_S)``, until ``EQM_WEBHOOK_RETRY_WINDOW_S``
   after the first attempt. ``410 Gone`` means the receiver wants no more: that delivery, the job's
   pending ones and its hook are dropped, and nothing more of that job is sent.

All of this state lives in Redis, so an API or worker restart loses nothing: the events are in the
job's stream, the cursor and the pending deliveries in their keys. The dispatcher runs in every API
process; a lease (``P:hooks:lease``, renewed every second, 5 s long) lets exactly one of them work at a
time and hands over when that process stops or dies. Message ids are derived from the event's
stream id, so a delivery created twice (a crash between the two writes) is the same message.

A URL that the sender cannot use (control characters, a bad host) is refused at submission; a record
from before that check is dropped at its first attempt, never retried.

SSRF: a URL is accepted only if its host (``host`` or ``host:port``) is in
``EQM_WEBHOOK_ALLOWED_HOSTS``; empty allows nothing. It is checked at submission (422) and again
before every attempt.

Body: ``{"type": "job.<event>", "timestamp": "<ISO 8601>", "data": {"id", "event", ...}}`` where
``event`` is ``started``, ``progress``, ``image``, ``done``, ``failed`` or ``cancelled`` and ``data``
carries the event's fields (``image`` adds the image's ``url``; ``completed`` the job's ``status``, ``url``
and image ``urls``).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx
import redis

from service.settings import Settings

log = logging.getLogger("eqm.webhooks")

EVENTS = ("start", "progress", "image", "completed")
WEBHOOK_EVENT = {"started": "start", "progress": "progress", "image": "image", "done": "completed",
                 "failed": "completed", "cancelled": "completed"}
PROGRESS_INTERVAL_S = 0.5          # at most 2 progress deliveries per second per job
LEASE_MS = 5000
DELIVERY_TIMEOUT_S = 5.0
FIRST_BACKOFF_S = 0.5
BATCH = 50                         # events collected per followed job per pass
DUE_SCAN = 2000                    # due deliveries looked at per pass (those of busy receivers are skipped)
DELIVERY_WORKERS = 32              # jobs whose deliveries are in flight at once, over every receiver
PER_RECEIVER = 2                   # of those, at most this many to one receiver (scheme://host:port)


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    events: tuple[str, ...]


class HookKeys:
    def __init__(self, prefix: str):
        self.follow = f"{prefix}:hooks:follow"
        self.due = f"{prefix}:hooks:due"
        self.lease = f"{prefix}:hooks:lease"
        self._prefix = prefix

    def hook(self, job_id: str) -> str:
        return f"{self._prefix}:hook:{job_id}"

    def msg(self, mid: str) -> str:
        return f"{self._prefix}:hooks:msg:{mid}"

    def job(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}:events"


# -- signing (Standard Webhooks) -----------------------------------------------------------------

def message_id(job_id: str, entry_id: str) -> str:
    """A delivery's id, derived from its event's stream id (so the same event is always the same message)."""
    return f"msg_{job_id}_{entry_id.replace('-', '_')}"


def message_job(mid: str) -> str:
    """The job of a delivery id (job ids may contain ``_``; the stream id's two parts are last)."""
    return mid[len("msg_"):].rsplit("_", 2)[0]


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ``ValueError`` with a one-line reason if malformed."""
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("EQM_WEBHOOK_SECRET must be 'whsec_' followed by base64 (e.g. 24 to 64 random bytes)") from None
    if len(key) < 16:
        raise ValueError("EQM_WEBHOOK_SECRET is too short: use at least 16 random bytes, base64-encoded")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# -- submission side -----------------------------------------------------------------------------

def _host_port(url: str) -> tuple[str, str, int]:
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):   # httpx would quietly encode a space
        raise ValueError("webhook is not a URL the sender can use: it contains spaces or control characters; "
                         "remove them (percent-encode a space as %20)")
    try:
        httpx.URL(url)        # the sender's own parser: urlsplit silently drops tabs and newlines, httpx refuses them
    except httpx.InvalidURL as exc:
        raise ValueError(f"webhook is not a URL the sender can use ({exc}); remove control characters and spaces") from None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"webhook must be an http or https URL, not {parts.scheme or 'a relative URL'!r}")
    if not parts.hostname or parts.username or parts.password:
        raise ValueError("webhook must be an absolute URL with a host and no user:password part")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("webhook URL has an invalid port") from None
    if port == 0:                               # not "no port": nothing can listen on port 0
        raise ValueError("webhook URL has port 0, which no receiver can listen on; give the receiver's port")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname.lower(), port


def receiver_of(url: str) -> str:
    """The receiver a delivery goes to, ``scheme://host:port`` (its deliveries share its slots); "" when
    the URL is unusable (its attempt drops it)."""
    try:
        scheme, host, port = _host_port(url)
    except ValueError:
        return ""
    return f"{scheme}://{host}:{port}"


def host_allowed(url: str, allowed: tuple[str, ...]) -> bool:
    _, host, port = _host_port(url)
    names = {a.strip().lower() for a in allowed}
    return host in names or f"{host}:{port}" in names or f"[{host}]:{port}" in names


def webhook_target(url: str, events: list[str] | None, settings: Settings) -> WebhookTarget:
    """A checked webhook of a request; ``ValueError`` with a one-line reason when refused."""
    if not settings.webhook_secret:
        raise ValueError("webhooks are off on this server (it has no EQM_WEBHOOK_SECRET to sign them with)")
    _, host, port = _host_port(url)
    if not host_allowed(url, settings.webhook_allowed_hosts):
        raise ValueError(f"webhook host {host}:{port} is not allowed: this server sends webhooks only to the "
                         f"hosts in EQM_WEBHOOK_ALLOWED_HOSTS")
    wanted = tuple(dict.fromkeys(events)) if events else EVENTS
    return WebhookTarget(url, wanted)


def register_webhook(r: redis.Redis, prefix: str, job_id: str, target: WebhookTarget, base: str, ttl_s: int) -> None:
    """Follow a job's events for its webhook (call before the job is queued, so no event is missed)."""
    k = HookKeys(prefix)
    pipe = r.pipeline(transaction=True)
    pipe.hset(k.hook(job_id), mapping={"url": target.url, "events": ",".join(target.events), "cursor": "0",
                                       "base": base, "last_progress": "0"})
    pipe.expire(k.hook(job_id), ttl_s)
    pipe.sadd(k.follow, job_id)
    pipe.execute()


def unregister_webhook(r: redis.Redis, prefix: str, job_id: str) -> None:
    """Stop following a job whose submission was refused after its webhook was registered."""
    k = HookKeys(prefix)
    pipe = r.pipeline(transaction=True)
    pipe.delete(k.hook(job_id))
    pipe.srem(k.follow, job_id)
    pipe.execute()


# -- the dispatcher ------------------------------------------------------------------------------

class WebhookDispatcher:
    """Collects followed jobs' events into deliveries and delivers them (see the module docstring)."""

    def __init__(self, r: redis.Redis, settings: Settings, name: str | None = None):
        self.r = r
        self.settings = settings
        self.key = signing_key(settings.webhook_secret)
        self.k = HookKeys(settings.key_prefix)
        self.name = name or uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # As many connections as attempts in flight: a hung receiver never holds one another needs.
        self._http = httpx.Client(timeout=DELIVERY_TIMEOUT_S, follow_redirects=False, trust_env=False,
                                  limits=httpx.Limits(max_connections=DELIVERY_WORKERS))
        self._pool = ThreadPoolExecutor(DELIVERY_WORKERS, thread_name_prefix="webhook-delivery")
        self._inflight: dict[str, str] = {}        # job -> receiver, for jobs a pool thread is delivering
        self._inflight_lock = threading.Lock()

    def start(self) -> "WebhookDispatcher":
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=DELIVERY_TIMEOUT_S + 2)
        self._pool.shutdown(wait=True)             # attempts in flight end (each within its timeout)
        try:
            self.r.eval(_RELEASE, 1, self.k.lease, self.name)
        except redis.RedisError:
            pass
        self._http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                if self._hold_lease():
                    busy = self.collect() | self.deliver_due()
                else:
                    self._stop.wait(1.0)
                    continue
            except redis.RedisError as exc:
                log.warning("webhooks: Redis unreachable (%s); retrying", exc)
                self._stop.wait(1.0)
            except Exception:          # never let one bad record stop every delivery
                log.exception("webhooks: unexpected error; continuing")
                self._stop.wait(1.0)
            if not busy:
                self._stop.wait(0.1)

    def _hold_lease(self) -> bool:
        return bool(self.r.eval(_LEASE, 1, self.k.lease, self.name, LEASE_MS))

    # -- collect --------------------------------------------------------------------------------
    def collect(self) -> bool:
        """Turn new events of followed jobs into due deliveries; True when any event was read.
        Two pipelined round trips for all followed jobs (hooks, then their new events), then one MULTI per
        job with news."""
        job_ids = [j.decode() for j in self.r.smembers(self.k.follow)]
        if not job_ids:
            return False
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.k.hook(job_id))
        hooks = [{k.decode(): v.decode() for k, v in raw.items()} for raw in pipe.execute()]
        live = [(j, h) for j, h in zip(job_ids, hooks) if h]
        gone = [j for j, h in zip(job_ids, hooks) if not h]          # expired with their jobs
        pipe = self.r.pipeline(transaction=False)
        for job_id, hook in live:
            start = f"({hook['cursor']}" if hook["cursor"] != "0" else "-"
            pipe.xrange(self.k.events(job_id), start, "+", count=BATCH)
        read_any = False
        # A hook is registered before its job record is written, so a job not (yet) in Redis proves nothing:
        # only the hook's own expiry (the job's TTL) ends the following.
        for (job_id, hook), entries in zip(live, pipe.execute()):
            if entries:
                read_any = True
                self._collect_entries(job_id, hook, entries)
        if gone:
            self.r.srem(self.k.follow, *gone)
        return read_any

    def _collect_entries(self, job_id: str, hook: dict[str, str], entries: list) -> None:
        wanted = set(hook["events"].split(","))
        last_progress = float(hook.get("last_progress") or 0)
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        final = False
        for entry_id, fields in entries:
            entry = entry_id.decode()
            event = fields[b"event"].decode()
            data = json.loads(fields[b"data"])
            kind = WEBHOOK_EVENT.get(event)
            final = final or kind == "completed"
            if kind is None or kind not in wanted:
                continue
            if kind == "progress":
                at = float(data.get("time") or now)
                if at - last_progress < PROGRESS_INTERVAL_S:
                    continue
                last_progress = at
            if kind == "completed":
                data = {**data, **self._completion(job_id, hook["base"])}
            elif kind == "image" and "index" in data:
                data = {**data, "url": f"{hook['base']}/v1/jobs/{job_id}/images/{data['index']}"}
            body = json.dumps({"type": f"job.{kind}",
                               "timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                               "data": {**data, "id": job_id, "event": event}}, separators=(",", ":"))
            mid = message_id(job_id, entry)
            pipe.hset(self.k.msg(mid), mapping={"url": hook["url"], "body": body, "first": now, "attempts": 0})
            pipe.expire(self.k.msg(mid), int(self.settings.webhook_retry_window_s) + 3600)
            pipe.zadd(self.k.due, {mid: now}, nx=True)
        cursor = entries[-1][0].decode()
        if final:
            pipe.srem(self.k.follow, job_id)
            pipe.delete(self.k.hook(job_id))
        else:
            pipe.hset(self.k.hook(job_id), mapping={"cursor": cursor, "last_progress": last_progress})
        pipe.execute()

    def _completion(self, job_id: str, base: str) -> dict:
        status, spec, images = self.r.hmget(self.k.job(job_id), "status", "spec", "images")
        n = len(json.loads(spec)["images"]) if spec else 0
        url = f"{base}/v1/jobs/{job_id}"
        return {"status": status.decode() if status else None, "url": url,
                "images": json.loads(images) if images else [],
                "urls": [f"{url}/images/{k}" for k in range(n)]}

    # -- deliver --------------------------------------------------------------------------------
    def deliver_due(self) -> bool:
        """Hand due deliveries to the pool, grouped by job (a job's messages go in order, one at a time),
        at most ``PER_RECEIVER`` jobs per receiver and ``DELIVERY_WORKERS`` in all; jobs already in flight
        are left for a later round. True when any delivery was handed out."""
        now = time.time()
        due = [m.decode() for m in self.r.zrangebyscore(self.k.due, "-inf", now, start=0, num=DUE_SCAN)]
        groups: dict[str, list[str]] = {}
        for mid in due:
            groups.setdefault(message_job(mid), []).append(mid)
        with self._inflight_lock:
            waiting = [(job_id, mids) for job_id, mids in groups.items() if job_id not in self._inflight]
        if not waiting:
            return False
        pipe = self.r.pipeline(transaction=False)
        for _, mids in waiting:
            pipe.hget(self.k.msg(mids[0]), "url")
        started = False
        for (job_id, mids), url in zip(waiting, pipe.execute()):
            receiver = receiver_of(url.decode()) if url else ""
            with self._inflight_lock:
                busy = list(self._inflight.values())
                if (self._stop.is_set() or len(busy) >= DELIVERY_WORKERS
                        or (receiver and busy.count(receiver) >= PER_RECEIVER)):
                    continue
                self._inflight[job_id] = receiver
            self._pool.submit(self._deliver_job, job_id, mids)
            started = True
        return started

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no delivery is in flight; False if some still are after ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._inflight_lock:
                if not self._inflight:
                    return True
            time.sleep(0.01)
        return False

    def _deliver_job(self, job_id: str, mids: list[str]) -> None:
        try:
            for mid in mids:
                if self._stop.is_set():
                    break
                outcome = self._attempt(mid)
                if outcome == "gone":
                    self._end_hook(job_id)
                if outcome != "done":        # a retry waits its turn, and the job's later messages with it
                    break
        except redis.RedisError as exc:
            log.warning("webhooks: Redis unreachable while delivering (%s); retrying later", exc)
        except Exception:                    # never let one bad record stop later deliveries
            log.exception("webhooks: unexpected error while delivering; continuing")
        finally:
            with self._inflight_lock:
                self._inflight.pop(job_id, None)

    def _end_hook(self, job_id: str) -> None:
        """The receiver answered 410 Gone: no more deliveries of this job, pending or to come."""
        pattern = "msg_" + "".join("\\" + c if c in "*?[]\\" else c for c in job_id) + "_*"     # glob-escaped
        pending = [m.decode() for m, _ in self.r.zscan_iter(self.k.due, match=pattern, count=500)]
        pending = [m for m in pending if message_job(m) == job_id]
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(self.k.follow, job_id)
        pipe.delete(self.k.hook(job_id))
        if pending:
            pipe.zrem(self.k.due, *pending)
            pipe.delete(*[self.k.msg(m) for m in pending])
        pipe.execute()
        log.info("webhook receiver of job %s answered 410 Gone: %d pending deliveries dropped, hook ended",
                 job_id, len(pending))

    def _attempt(self, mid: str) -> str:
        """One attempt of one delivery: ``done`` (delivered, or dropped for good), ``retry`` (rescheduled,
        or not due any more) or ``gone`` (the receiver answered 410: nothing more for this hook)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k.msg(mid))
        pipe.zscore(self.k.due, mid)
        raw, due_at = pipe.execute()
        if not raw:
            self.r.zrem(self.k.due, mid)
            return "done"
        if due_at is None:                             # delivered since it was listed
            return "done"
        if due_at > time.time():                       # rescheduled since it was listed
            return "retry"
        msg = {k.decode(): v.decode() for k, v in raw.items()}
        url, body = msg["url"], msg["body"]
        attempts, first = int(msg["attempts"]) + 1, float(msg["first"])
        try:
            allowed = host_allowed(url, self.settings.webhook_allowed_hosts)
        except ValueError as exc:                      # a record written before the URL was checked by httpx
            log.warning("webhook %s dropped: %s", mid, exc)
            self._done(mid)
            return "done"
        if not allowed:
            log.warning("webhook %s to %r dropped: the host is no longer allowed", mid, url)
            self._done(mid)
            return "done"
        timestamp, resp = int(time.time()), None
        headers = {"content-type": "application/json", "user-agent": "eqm-webhooks", "webhook-id": mid,
                   "webhook-timestamp": str(timestamp), "webhook-signature": sign(self.key, mid, timestamp, body)}
        try:
            resp = self._http.post(url, content=body.encode(), headers=headers)
            ok, why = 200 <= resp.status_code < 300, f"HTTP {resp.status_code}"
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:   # permanent: retrying cannot help
            log.warning("webhook %s to %r dropped: %s", mid, url, exc)
            self._done(mid)
            return "done"
        except httpx.HTTPError as exc:
            ok, why = False, type(exc).__name__
        if ok:
            self._done(mid)
            return "done"
        if resp is not None and resp.status_code == 410:
            self._done(mid)
            return "gone"
        now = time.time()
        if now - first > self.settings.webhook_retry_window_s:
            log.warning("webhook %s to %s given up after %d attempts (%s)", mid, url, attempts, why)
            self._done(mid)
            return "done"
        delay = min(FIRST_BACKOFF_S * 2 ** (attempts - 1), self.settings.webhook_max_backoff_s)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k.msg(mid), "attempts", attempts)
        pipe.zadd(self.k.due, {mid: now + delay})
        pipe.execute()
        log.info("webhook %s to %s failed (%s); attempt %d in %.1fs", mid, url, why, attempts + 1, delay)
        return "retry"

    def _done(self, mid: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(self.k.due, mid)
        pipe.delete(self.k.msg(mid))
        pipe.execute()


# Take or renew the lease when free or ours.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
