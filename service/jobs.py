"""Jobs in Redis: the contract between the HTTP API and the workers.

Keys (``P`` = settings.key_prefix, default ``eqm``):

- ``P:jobs``                 stream of job ids (field ``id``); consumer group ``P:workers``. A worker
                             reads with XREADGROUP, acks when the job's results are stored; a dead
                             worker's entries are reclaimed with XAUTOCLAIM after ``claim_idle_ms``.
- ``P:job:<id>``             hash, the job record: ``spec`` (JSON of ``JobSpec``), ``status``
                             (queued|running|done|failed|cancelled), ``created``/``started``/``finished``
                             (unix seconds), ``worker``, ``attempts``, ``error``, ``progress`` (JSON list, one
                             ``{"index", "steps", "grad_norm"}`` per image), ``images`` (JSON list of ``ImageResult``
                             dicts once done), ``cancel`` ("1" once a cancel was asked), ``ready:<k>`` ("1"
                             once image k is stored, written after it). TTL: result_ttl_s.
- ``P:job:<id>:input``       bytes of the uploaded image for denoising (already cropped to the model's size, PNG).
- ``P:job:<id>:image:<k>``   encoded bytes of image k (PNG/JPEG/WebP). TTL: result_ttl_s.
- ``P:job:<id>:events``      stream of progress events (fields ``event`` and ``data`` JSON), MAXLEN ~1000;
                             events: ``queued``, ``started``, ``progress``, ``image``, ``done``, ``failed``,
                             ``cancelled``. Server-sent events replay it with XREAD.
- ``P:queued``               set of ids not yet started (queue depth = SCARD).
- ``P:cancel``               pub/sub channel: job ids whose cancellation was asked.
- ``P:workers``              hash worker name -> JSON ``{"device", "model", "metrics_url", "seen", "pid",
                             "capacity", "jobs"}``; a worker whose ``seen`` is older than 3 heartbeats is not
                             live. A worker stopped gracefully hands unfinished jobs back: status ``queued``
                             again, id back in ``P:queued`` and a new stream entry (event ``queued``).
- ``P:deadletter``           stream of ``{"id", "reason"}`` for jobs delivered too many times.
- ``P:idem:<caller>:<h>``    string, JSON ``{"job", "fingerprint"}``: the job an ``Idempotency-Key`` (SHA-256
                             ``h``) of that caller created. SET NX, TTL: result_ttl_s.
- ``P:owned:<caller>``       sorted set job id -> created (unix seconds): the caller's jobs, newest last;
                             entries older than result_ttl_s are trimmed at each submission. The record
                             holds the same caller in its ``owner`` field.
- ``P:recent``               sorted set job id -> created of the last 200 submitted jobs of every caller
                             (throughput for queue ETAs).
- ``P:score:<id>:input:<k>`` bytes of image k of a score job (PNG, model-sized); ``scores`` in the record is
                             the JSON list of per-image results once done. TTL: result_ttl_s.
- ``P:hooks:*``              webhook deliveries (``service.webhooks``): ``P:hooks:follow`` (set of followed
                             job ids), ``P:hook:<id>`` (hash: url, events, cursor, base), ``P:hooks:due``
                             (sorted set delivery id -> due time), ``P:hooks:msg:<mid>`` (hash: url, body,
                             first attempt, attempts), ``P:hooks:lease`` (the delivering process).
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

JOB_KINDS = ("generate", "denoise", "compose")
STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATUSES = ("done", "failed", "cancelled")
RECENT_JOBS = 200
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass
class SamplerSpec:
    sampler: str = "nag"
    step_size: float = 0.0017
    mu: float = 0.3
    max_steps: int = 249
    grad_norm_threshold: float = 0.0


@dataclass
class ImageSpec:
    """One image of a job: its labels (empty = unconditional; 2+ = composition), weights and seed."""

    seed: int
    labels: list[int] = field(default_factory=list)
    weights: list[float] | None = None


@dataclass
class JobSpec:
    kind: str
    model: str
    images: list[ImageSpec]
    cfg_scale: float = 1.0
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    deadline: float | None = None          # unix seconds; samples still running then return their iterate, flagged
    format: str = "png"
    noise_level: float | None = None       # denoise: g in g*x + (1-g)*eps before the descent (None = no extra noise)
    priority: int = 0                      # higher first
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "JobSpec":
        raw = json.loads(text)
        raw["images"] = [ImageSpec(**i) for i in raw["images"]]
        raw["sampler"] = SamplerSpec(**raw["sampler"])
        return cls(**raw)


@dataclass
class ImageResult:
    index: int
    steps: int                   # gradient updates taken
    grad_norm: float             # last ||grad||
    stopped_early: bool          # below its gradient-norm threshold before the step cap
    deadline_exceeded: bool = False
    content_type: str = "image/png"


class Keys:
    """Redis key names under one prefix."""

    def __init__(self, prefix: str = "eqm"):
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"
        self.group = f"{prefix}:workers"
        self.queued = f"{prefix}:queued"
        self.cancel_channel = f"{prefix}:cancel"
        self.workers = f"{prefix}:workers"
        self.deadletter = f"{prefix}:deadletter"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def input(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:input"

    def image(self, job_id: str, k: int) -> str:
        return f"{self.prefix}:job:{job_id}:image:{k}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"


class JobStore:
    """Client side of the queue: submit, read, cancel, stream events. Used by the API and tests."""

    def __init__(self, client: redis.Redis, prefix: str = "eqm", ttl_s: int = 3600):
        self.r = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def queue_depth(self) -> int:
        return int(self.r.scard(self.keys.queued))

    def submit(self, spec: JobSpec, input_png: bytes | None = None) -> str:
        """Store the record (and upload), then enqueue: one MULTI, so a job is never half-submitted."""
        self.ensure_group()
        k = self.keys
        now = time.time()
        record = {"spec": spec.to_json(), "status": "queued", "created": now, "attempts": 0,
                  "progress": json.dumps([{"steps": 0, "grad_norm": None} for _ in spec.images])}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(k.job(spec.id), mapping=record)
        pipe.expire(k.job(spec.id), self.ttl_s)
        if input_png is not None:
            pipe.set(k.input(spec.id), input_png, ex=self.ttl_s)
        pipe.xadd(k.events(spec.id), {"event": "queued", "data": json.dumps({"id": spec.id, "time": now})}, maxlen=1000)
        pipe.expire(k.events(spec.id), self.ttl_s)
        pipe.sadd(k.queued, spec.id)
        pipe.xadd(k.stream, {"id": spec.id})
        pipe.execute()
        return spec.id

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record in one round trip (one HGETALL); ``ready`` says which images are stored."""
        raw = self.r.hgetall(self.keys.job(job_id))
        if not raw:
            return None
        rec = {key.decode(): val.decode() for key, val in raw.items()}
        out: dict[str, Any] = {"id": job_id, "status": rec.get("status", "queued")}
        out["spec"] = json.loads(rec["spec"])
        for name in ("created", "started", "finished"):
            out[name] = float(rec[name]) if rec.get(name) else None
        out["attempts"] = int(rec.get("attempts", 0))
        out["worker"] = rec.get("worker")
        out["error"] = rec.get("error")
        out["progress"] = json.loads(rec.get("progress", "[]"))
        out["images"] = json.loads(rec.get("images", "[]"))
        out["cancel_requested"] = rec.get("cancel") == "1"
        # Stored images: marked one by one as the worker stores them; a final record lists them too.
        listed = {int(i["index"]) for i in out["images"]}
        out["ready"] = [f"ready:{k}" in rec or k in listed for k in range(len(out["spec"]["images"]))]
        return out

    def image(self, job_id: str, k: int) -> bytes | None:
        return self.r.get(self.keys.image(job_id, k))

    def cancel(self, job_id: str) -> str | None:
        """Ask for cancellation; returns the status then (None if unknown). Final jobs are left alone."""
        key = self.keys.job(job_id)
        status = self.r.hget(key, "status")
        if status is None:
            return None
        status = status.decode()
        if status in FINAL_STATUSES:
            return status
        self.r.hset(key, "cancel", "1")
        if self.r.srem(self.keys.queued, job_id):
            # Not started yet: cancel right here; a worker that later reads the entry skips it.
            self.finish(job_id, "cancelled")
            return "cancelled"
        self.r.publish(self.keys.cancel_channel, job_id)
        return status

    def finish(self, job_id: str, status: str, error: str | None = None, images: list[ImageResult] | None = None) -> None:
        """Write a final status once (a Lua check-and-set: a second finisher changes nothing)."""
        now = time.time()
        mapping = {"status": status, "finished": now}
        if error:
            mapping["error"] = error
        if images is not None:
            mapping["images"] = json.dumps([asdict(i) for i in images])
        finished = self.r.eval(_FINISH_ONCE, 1, self.keys.job(job_id), json.dumps(mapping))
        if finished:
            self.publish(job_id, status, {"id": job_id, "status": status, "error": error, "time": now})

    def publish(self, job_id: str, event: str, data: dict) -> None:
        key = self.keys.events(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(key, {"event": event, "data": json.dumps(data)}, maxlen=1000)
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def events(self, job_id: str, last_id: str = "0", block_ms: int = 1000) -> list[tuple[str, str, dict]]:
        """Events after ``last_id``: ``[(entry_id, event, data)]``, waiting up to ``block_ms`` for the first."""
        reply = self.r.xread({self.keys.events(job_id): last_id}, block=block_ms, count=100)
        out = []
        for _, entries in reply or []:
            for entry_id, fields_ in entries:
                out.append((entry_id.decode(), fields_[b"event"].decode(), json.loads(fields_[b"data"])))
        return out

    # -- callers: idempotency keys and job listings ----------------------------------------------
    def idempotency_key(self, caller: str, key: str) -> str:
        return f"{self.keys.prefix}:idem:{caller}:{hashlib.sha256(key.encode()).hexdigest()}"

    def idempotent_job(self, caller: str, key: str) -> dict | None:
        """``{"job", "fingerprint"}`` recorded for this caller's key, or None."""
        raw = self.r.get(self.idempotency_key(caller, key))
        return json.loads(raw) if raw else None

    def claim_idempotency(self, caller: str, key: str, fingerprint: str, job_id: str) -> dict | None:
        """Record key -> job unless the key is taken; returns the existing record when it was."""
        name = self.idempotency_key(caller, key)
        if self.r.set(name, json.dumps({"job": job_id, "fingerprint": fingerprint}), nx=True, ex=self.ttl_s):
            return None
        return self.idempotent_job(caller, key)

    def release_idempotency(self, caller: str, key: str) -> None:
        self.r.delete(self.idempotency_key(caller, key))

    @property
    def recent_key(self) -> str:
        return f"{self.keys.prefix}:recent"

    def owned_key(self, caller: str) -> str:
        return f"{self.keys.prefix}:owned:{caller}"

    def record_owner(self, caller: str, job_id: str, created: float) -> None:
        """Index a submitted job under its caller (listings) and note the caller in the record."""
        index = self.owned_key(caller)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.job(job_id), "owner", caller)
        pipe.zadd(index, {job_id: created})
        pipe.zremrangebyscore(index, "-inf", f"({created - self.ttl_s}")
        pipe.expire(index, self.ttl_s)
        pipe.zadd(self.recent_key, {job_id: created})
        pipe.zremrangebyrank(self.recent_key, 0, -RECENT_JOBS - 1)
        pipe.execute()

    def owned_jobs(self, caller: str, before: float | None, limit: int) -> list[tuple[str, float]]:
        """Up to ``limit`` of the caller's job ids created strictly before ``before``, newest first."""
        top = f"({before}" if before is not None else "+inf"
        rows = self.r.zrevrangebyscore(self.owned_key(caller), top, "-inf", start=0, num=limit, withscores=True)
        return [(job_id.decode(), float(score)) for job_id, score in rows]

    def forget_owned(self, caller: str, job_ids: list[str]) -> None:
        if job_ids:
            self.r.zrem(self.owned_key(caller), *job_ids)

    def live_workers(self, heartbeat_s: float = 2.0) -> dict[str, dict]:
        now = time.time()
        out = {}
        for name, raw in self.r.hgetall(self.keys.workers).items():
            info = json.loads(raw)
            if now - float(info.get("seen", 0)) <= 3 * heartbeat_s:
                out[name.decode()] = info
        return out


# Set the final fields only if the job is not final yet; returns 1 when it did.
_FINISH_ONCE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'done' or status == 'failed' or status == 'cancelled' then return 0 end
local fields = cjson.decode(ARGV[1])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, tostring(v)) end
return 1
"""
