"""Jobs in Redis: the contract between the HTTP API and the workers.

Keys (``P`` = settings.key_prefix, default ``eqm``):

- ``P:jobs:<model>``         a stream per model of job ids (field ``id``); consumer group ``P:workers`` on
                             each. Only workers of that model read it (``Keys.stream_for``; ``JobStore.submit``
                             routes a spec by its ``model``), so one model's backlog never delays another's.
                             A worker reads with XREADGROUP only what it can start soon, acks when the job's
                             results are stored; a dead worker's entries are reclaimed with XAUTOCLAIM (walking
                             the cursor over the whole pending list) once idle ``claim_idle_ms``, by a worker of
                             the same model.
- ``P:job:<id>``             hash, the job record: ``spec`` (JSON of ``JobSpec``), ``status``
                             (queued|running|done|failed|cancelled), ``created``/``started``/``finished``
                             (unix seconds), ``worker`` (the consumer holding the job now: the fencing token,
                             every worker write checks it), ``attempts`` (times started), ``lost`` (times the
                             worker running it died or stalled: only these count toward dead-lettering),
                             ``error``, ``progress`` (JSON list, one ``{"index", "steps", "grad_norm"}`` per
                             image), ``images`` (JSON list of ``ImageResult`` dicts once done), ``cancel`` ("1"
                             once a cancel was asked), ``ready:<k>`` ("1" once image k is stored, written after
                             it), ``owner`` (digest of the API key that made it, if keys are on).
- ``P:job:<id>:input``       bytes of the uploaded image for denoising (already cropped to the model's size, PNG).
- ``P:job:<id>:image:<k>``   encoded bytes of image k (PNG/JPEG/WebP).
- ``P:job:<id>:events``      stream of progress events (fields ``event`` and ``data`` JSON), MAXLEN ~1000;
                             events: ``queued``, ``started``, ``progress``, ``image``, ``done``, ``failed``,
                             ``cancelled``. Server-sent events replay it with XREAD.
- ``P:queued``               set of ids whose status is ``queued`` (queue depth = SCARD); it never holds a
                             job in another state or a job whose record is gone (the worker that reads an
                             expired job's entry removes it). ``P:queued:<model>``: the same for one model
                             (per-model admission: ``max_queue`` counts it), kept in the same scripts.
- ``P:cancel``               pub/sub channel: job ids whose cancellation was asked.
- ``P:workers``              hash worker name -> JSON ``{"device", "model", "models", "metrics_url", "seen",
                             "pid", "capacity", "jobs"}`` (``models``: every model it serves); a worker whose ``seen`` is older than 3 heartbeats is not
                             live. Dead workers' entries (and their consumers in the group) are pruned once
                             they hold no pending entries. A worker stopped gracefully hands unfinished jobs
                             back: status ``queued`` again, id back in ``P:queued`` and a new stream entry.
- ``P:deadletter``           stream of ``{"id", "model", "reason"}`` for jobs whose workers died ``max_deliveries``
                             times.
- ``P:idem:<caller>:<h>``    string, JSON ``{"job", "fingerprint"}``: the job an ``Idempotency-Key`` (SHA-256
                             ``h``) of that caller created. SET NX, TTL: result_ttl_s.
- ``P:owned:<caller>``       sorted set job id -> created (unix seconds): the caller's jobs, newest last
                             (``P:owned:*``: every caller's, what an admin key lists);
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

Lifetime: every key of a job expires ``result_ttl_s`` after the job **finishes** (the finish script sets
the TTL of the record, events, input and images together). Before that the record carries the same TTL
from submission, refreshed when the job starts, so an abandoned job still goes away. Nothing re-creates
an expired record: progress, events, start, cancel and finish are Lua scripts that do nothing (and say
so) when the record is gone.

Atomicity: submission (with the queue limit), start, cancel, progress and finish are each one Lua
script. Redis runs a script whole or, refused for lack of memory at its first write, not at all, so a
full Redis (``maxmemory`` with ``noeviction``) leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.commands.core import Script

JOB_KINDS = ("generate", "denoise", "compose", "inpaint")
STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATUSES = ("done", "failed", "cancelled")
RECENT_JOBS = 200
EVERY_CALLER = "*"           # the owned index of every caller's jobs (no key digest is "*")
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass
class SamplerSpec:
    sampler: str = "nag"
    step_size: float = 0.0017
    mu: float = 0.3
    max_steps: int = 249
    grad_norm_threshold: float = 0.0
    epsilon_max: float = 0.0               # heun-sde only: temperature reached at t = 1
    time_cutoff: float = 1.0               # heun-sde only: temperature is 0 before this time


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
    compose_mode: str = "guided"           # guided: u + s*sum w_k (c_k - u); sum: sum w_k c_k (no null row)
    mask: str | None = None                # inpaint: base64 of np.packbits of the (H, W) bool mask, True = regenerate
    results: str | None = None             # sampling-run shard: its file in the results store (images skip Redis)
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
    energy: float | None = None  # final energy (lower on data) where the model has one (EqM-E)


MODEL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_model_name(name: str) -> str:
    """A model's name is part of Redis keys: letters, digits, '.', '_' and '-' only."""
    if not name or not set(name) <= MODEL_NAME_CHARS:
        raise ValueError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (it names the model's queue); "
                         "rename the checkpoint file or set EQM_MODEL_NAME")
    return name


def worker_serves(worker: dict, model: str) -> bool:
    """Whether a worker's heartbeat says it serves ``model`` (``models`` lists every model it holds)."""
    return model in (worker.get("models") or [worker.get("model")])


class Keys:
    """Redis key names under one prefix."""

    def __init__(self, prefix: str = "eqm"):
        self.prefix = prefix
        self.group = f"{prefix}:workers"
        self.queued = f"{prefix}:queued"
        self.cancel_channel = f"{prefix}:cancel"
        self.workers = f"{prefix}:workers"
        self.deadletter = f"{prefix}:deadletter"

    def stream_for(self, model: str) -> str:
        """The stream of one model's jobs: only that model's workers read it."""
        return f"{self.prefix}:jobs:{model}"

    def queued_for(self, model: str) -> str:
        """The set of one model's queued job ids (its queue depth); scripts derive it as ``queued .. ':' .. model``."""
        return f"{self.queued}:{model}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def previews(self, job_id: str) -> str:
        """Set (with a short TTL, refreshed) while a client follows the job's events with previews."""
        return f"{self.prefix}:job:{job_id}:previews"

    def input(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:input"

    def image(self, job_id: str, k: int) -> str:
        return f"{self.prefix}:job:{job_id}:image:{k}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"


def is_oom(exc: BaseException) -> bool:
    """Redis refused a write for lack of memory (``maxmemory`` reached under ``noeviction``); inside a
    script the refusal arrives as a script error that quotes it."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "command not allowed when used memory" in str(exc))


# Errors after which retrying later helps: Redis down or unreachable, or full (checked with ``is_oom``).
REDIS_BUSY = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)


class QueueFull(Exception):
    """The queue holds ``limit`` jobs: the submission was refused and nothing was written."""

    def __init__(self, depth: int, limit: int):
        super().__init__(f"the queue is full ({depth} jobs waiting, limit {limit})")
        self.depth, self.limit = depth, limit


class JobStore:
    """Client side of the queue: submit, read, cancel, stream events. Used by the API and tests; the
    worker uses its scripts too (``start``, ``event``, ``finish`` with its name as the fencing token)."""

    def __init__(self, client: redis.Redis, prefix: str = "eqm", ttl_s: int = 3600):
        self.r = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.scripts = Scripts(client)

    def ensure_group(self, model: str) -> None:
        """The model's stream and its consumer group (created once; harmless when they exist)."""
        try:
            self.r.xgroup_create(self.keys.stream_for(model), self.keys.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def queue_depth(self, model: str | None = None) -> int:
        """Jobs queued (submitted, not started): of one model, or of every model."""
        return int(self.r.scard(self.keys.queued if model is None else self.keys.queued_for(model)))

    def enqueue(self, spec: JobSpec, input_png: bytes | None = None, max_queue: int = 0,
                owner: str | None = None) -> str:
        """``submit``: the job goes to the queue of ``spec.model``."""
        return self.submit(spec, input_png, max_queue, owner)

    def submit(self, spec: JobSpec, input_png: bytes | None = None, max_queue: int = 0,
               owner: str | None = None) -> str:
        """Store the record (and upload), then enqueue on the stream of ``spec.model``, in one script: a job is
        never half-submitted, and with ``max_queue`` > 0 the limit (on that model's queue) is checked in the
        same step (``QueueFull``, nothing written)."""
        check_model_name(spec.model)
        self.ensure_group(spec.model)
        k = self.keys
        now = time.time()
        record = {"spec": spec.to_json(), "status": "queued", "created": repr(now), "attempts": "0",
                  "progress": json.dumps([{"steps": 0, "grad_norm": None} for _ in spec.images])}
        if owner:
            record["owner"] = owner
        event = json.dumps({"id": spec.id, "time": now})
        ok, depth = self.scripts.submit(
            keys=[k.job(spec.id), k.input(spec.id), k.events(spec.id), k.queued, k.stream_for(spec.model),
                  k.queued_for(spec.model)],
            args=[max_queue, self.ttl_s, spec.id, json.dumps(record), event,
                  "1" if input_png is not None else "0", input_png or b""])
        if not ok:
            raise QueueFull(int(depth), max_queue)
        return spec.id

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record in one round trip (one HGETALL); ``ready`` says which images are stored."""
        raw = self.r.hgetall(self.keys.job(job_id))
        if not raw or b"spec" not in raw:
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

    def owner(self, job_id: str) -> tuple[bool, str | None]:
        """(whether the job exists, the id of the API key that made it or None)."""
        exists, owner = self.r.hmget(self.keys.job(job_id), "spec", "owner")
        return exists is not None, owner.decode() if owner else None

    def image(self, job_id: str, k: int) -> bytes | None:
        return self.r.get(self.keys.image(job_id, k))

    def cancel(self, job_id: str) -> str | None:
        """Ask for cancellation; returns the status then (None if unknown). Final jobs are left alone; a
        queued one is cancelled here and now; a running one stops at its worker's next step. One script:
        a job cannot start between the check and the cancel, and a gone record is never re-created."""
        k = self.keys
        now = time.time()
        event = json.dumps({"id": job_id, "status": "cancelled", "error": None, "time": now})
        status = self.scripts.cancel(
            keys=[k.job(job_id), k.events(job_id), k.input(job_id), k.queued],
            args=[job_id, repr(now), self.ttl_s, k.image(job_id, ""), event, k.cancel_channel])
        return status.decode() if status else None

    def finish(self, job_id: str, status: str, error: str | None = None, images: list[ImageResult] | None = None,
               worker: str = "", progress: str | None = None, extra: dict[str, str] | None = None) -> int:
        """Write a final status once, with its event (and ``extra`` record fields, in the same write), and
        start the TTL of every key of the job. Returns 1 when written, 0 when the job was already final
        or is gone, -1 when ``worker`` is given and no longer holds the job (fenced: another worker took it over)."""
        k = self.keys
        now = time.time()
        fields = {**(extra or {}), "status": status, "finished": repr(now)}
        if error:
            fields["error"] = error
        if images is not None:
            fields["images"] = json.dumps([asdict(i) for i in images])
        if progress:
            fields["progress"] = progress
        event = json.dumps({"id": job_id, "status": status, "error": error, "time": now})
        return int(self.scripts.finish(
            keys=[k.job(job_id), k.events(job_id), k.input(job_id), k.queued],
            args=[job_id, json.dumps(fields), self.ttl_s, k.image(job_id, ""), status, event, worker]))

    def publish(self, job_id: str, event: str, data: dict, worker: str = "", progress: str | None = None,
                mark: str | None = None, client=None) -> int:
        """Append an event (and optionally the record's ``progress``, or set its field ``mark`` to 1) if the
        record exists and, when ``worker`` is given, that worker still holds the job. ``client`` may be a
        pipeline."""
        k = self.keys
        return self.scripts.event(keys=[k.job(job_id), k.events(job_id)],
                                  args=[worker, "" if progress is None else progress, event, json.dumps(data),
                                        self.ttl_s, mark or ""], client=client)

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
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.job(job_id), "owner", caller)
        for index in {self.owned_key(caller), self.owned_key(EVERY_CALLER)}:     # the second: admin listings
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

    def stream_lag(self, model: str) -> int:
        """Entries of the model's stream its group has not delivered yet (XINFO GROUPS ``lag``; 0 without a group)."""
        try:
            groups = self.r.xinfo_groups(self.keys.stream_for(model))
        except redis.ResponseError:            # no stream yet
            return 0
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name == self.keys.group:
                if group.get("lag") is not None:       # Redis 7 keeps it
                    return int(group["lag"])
                last = group["last-delivered-id"]
                last = last.decode() if isinstance(last, bytes) else last
                # Older Redis: count the entries after the last delivered one (bounded walk).
                return len(self.r.xrange(self.keys.stream_for(model), f"({last}", "+", count=100_000))
        return 0

    def queued_models(self) -> list[str]:
        """Every model that has a stream (jobs were queued for it once), served or not."""
        prefix = self.keys.stream_for("")
        return sorted(key.decode()[len(prefix):] for key in self.r.scan_iter(match=prefix + "*", _type="STREAM"))

    def fail_removed_model(self, model: str, reason: str) -> int:
        """Fail every job still queued for a model no longer served (nothing would ever take them), then
        drop its stream; returns how many failed. Jobs already final, or running on a worker, are left alone."""
        stream = self.keys.stream_for(model)
        failed = 0
        for _, fields in self.r.xrange(stream):
            job_id = fields.get(b"id", b"").decode()
            if job_id and self.r.hget(self.keys.job(job_id), "status") == b"queued":
                failed += max(0, self.finish(job_id, "failed", error=reason))
        self.r.delete(stream, self.keys.queued_for(model))
        return failed

    def live_workers(self, heartbeat_s: float = 2.0) -> dict[str, dict]:
        now = time.time()
        out = {}
        for name, raw in self.r.hgetall(self.keys.workers).items():
            info = json.loads(raw)
            if now - float(info.get("seen", 0)) <= 3 * heartbeat_s:
                out[name.decode()] = info
        return out


class Scripts:
    """The Lua scripts of the contract, loaded once per client (EVALSHA, reloaded if Redis restarts)."""

    def __init__(self, client: redis.Redis):
        self.submit: Script = client.register_script(_SUBMIT)
        self.cancel: Script = client.register_script(_FINAL_HELPERS + _CANCEL)
        self.finish: Script = client.register_script(_FINAL_HELPERS + _FINISH)
        self.event: Script = client.register_script(_EVENT)
        self.take: Script = client.register_script(_TAKE)
        self.start: Script = client.register_script(_START)
        self.hand_back: Script = client.register_script(_HAND_BACK)
        self.ack: Script = client.register_script(_ACK_IF_MINE)
        self.refresh: Script = client.register_script(_REFRESH)
        self.prune: Script = client.register_script(_PRUNE)


# Each script's first write is an HSET (or SET): Redis refuses a script for lack of memory only at its
# first write, so a script either runs whole or changes nothing.

# KEYS: job, input, events, queued, the model's stream, the model's queued set. ARGV: limit, ttl, id, record
# JSON (strings), queued event data, has_input, input bytes. Returns {1, depth} when queued, {0, depth} when the
# model's queue is full.
_SUBMIT = """
local limit = tonumber(ARGV[1])
local depth = redis.call('SCARD', KEYS[6])
if limit > 0 and depth >= limit then return {0, depth} end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[6] == '1' then redis.call('SET', KEYS[2], ARGV[7], 'EX', ARGV[2]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', 'event', 'queued', 'data', ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('SADD', KEYS[6], ARGV[3])
redis.call('XADD', KEYS[5], '*', 'id', ARGV[3])
return {1, depth + 1}
"""

# Shared by cancel and finish. KEYS: job, events, input, queued.
_FINAL_HELPERS = """
local function is_final(status)
  return status == 'done' or status == 'failed' or status == 'cancelled'
end
-- write the final fields and event, leave the queued set, and start the TTL of every key of the job
local function finalize(id, fields, ttl, image_prefix, event, data)
  for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'event', event, 'data', data)
  local spec = cjson.decode(redis.call('HGET', KEYS[1], 'spec'))
  redis.call('SREM', KEYS[4], id)
  redis.call('SREM', KEYS[4] .. ':' .. spec['model'], id)
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  for k = 0, #spec['images'] - 1 do redis.call('EXPIRE', image_prefix .. k, ttl) end
end
"""

# ARGV: id, now, ttl, image key prefix, cancelled event data, cancel channel. Returns the status then.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or redis.call('HEXISTS', KEYS[1], 'spec') == 0 then return false end
if is_final(status) then return status end
redis.call('HSET', KEYS[1], 'cancel', '1')
if status == 'queued' then
  finalize(ARGV[1], {status = 'cancelled', finished = ARGV[2]}, ARGV[3], ARGV[4], 'cancelled', ARGV[5])
  status = 'cancelled'
end
-- a worker may hold the job (fetched, not started yet, or running): it drops it at its next step
redis.call('PUBLISH', ARGV[6], ARGV[1])
return status
"""

# ARGV: id, fields JSON (strings), ttl, image key prefix, status, event data, worker ('' = anyone).
# Returns 1 written, 0 already final or gone, -1 the worker no longer holds the job.
_FINISH = """
local status, spec, holder = unpack(redis.call('HMGET', KEYS[1], 'status', 'spec', 'worker'))
if not status or not spec or is_final(status) then return 0 end
if ARGV[7] ~= '' and holder ~= ARGV[7] then return -1 end
finalize(ARGV[1], cjson.decode(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# KEYS: job, events. ARGV: worker ('' = anyone), progress JSON ('' = leave), event, data, ttl,
# a record field to set to 1 ('' = none; ``ready:<k>`` once image k is stored).
# Returns 1 written, 0 the record is gone or final, -1 the worker no longer holds the job.
_EVENT = """
local status, holder = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker'))
if not status then return 0 end
if ARGV[1] ~= '' then
  if holder ~= ARGV[1] then return -1 end
  if status == 'done' or status == 'failed' or status == 'cancelled' then return 0 end
end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[2]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], ARGV[6], '1') end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'event', ARGV[3], 'data', ARGV[4])
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
return 1
"""

# A worker takes a job it read from its model's stream (new or reclaimed). KEYS: job, queued, the model's queued.
# ARGV: worker, id, reclaimed ('1'/'0'), max_lost. Returns {state, spec or '', lost}:
# missing (record gone: left the queued set), final, cancel, dead (lost >= max_lost), taken.
# A reclaimed job that was *running* on another worker counts one loss; one that was only waiting
# there counts nothing, and goes back to queued (it is not running anywhere now).
_TAKE = """
local status, spec, cancel, holder, lost = unpack(redis.call('HMGET', KEYS[1], 'status', 'spec', 'cancel',
                                                                'worker', 'lost'))
if not status or not spec then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return {'missing', '', 0}
end
if status == 'done' or status == 'failed' or status == 'cancelled' then return {'final', '', 0} end
if cancel == '1' then return {'cancel', '', 0} end
lost = tonumber(lost or '0')
if ARGV[3] == '1' and status == 'running' and holder ~= ARGV[1] then
  lost = redis.call('HINCRBY', KEYS[1], 'lost', 1)
  if lost >= tonumber(ARGV[4]) then return {'dead', '', lost} end
end
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'status', 'queued')
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return {'taken', spec, lost}
"""

# The engine admitted a job's first sample: it runs now. KEYS: job, queued, events.
# ARGV: now, worker, id, ttl, started event data. Returns started | missing | final | lost | cancel.
_START = """
local status, holder, cancel, spec = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker', 'cancel', 'spec'))
if not status or not spec then return 'missing' end
if status == 'done' or status == 'failed' or status == 'cancelled' then return 'final' end
if holder ~= ARGV[2] then return 'lost' end
if cancel == '1' then return 'cancel' end
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SREM', KEYS[2], ARGV[3])
redis.call('SREM', KEYS[2] .. ':' .. cjson.decode(spec)['model'], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', 'event', 'started', 'data', ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 'started'
"""

# Graceful stop: re-queue a job this worker holds unless it is final; ack and delete the old entry
# if it is still this worker's. KEYS: job, stream, queued. ARGV: group, entry id, job id, worker.
# Returns 1 re-queued, 0 not (final, gone, or held by another worker now).
_HAND_BACK = """
local status, holder, spec = unpack(redis.call('HMGET', KEYS[1], 'status', 'worker', 'spec'))
local pending = redis.call('XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
if not pending[1] or pending[1][2] ~= ARGV[4] then return 0 end
local requeue = status and spec and holder == ARGV[4] and status ~= 'done' and status ~= 'failed' and status ~= 'cancelled'
if requeue then
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], 'worker')
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('SADD', KEYS[3] .. ':' .. cjson.decode(spec)['model'], ARGV[3])
  redis.call('XADD', KEYS[2], '*', 'id', ARGV[3])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if requeue then return 1 end
return 0
"""

# Ack and delete an entry only if this consumer still owns it (another worker may have claimed it:
# acking it then would drop that worker's claim). KEYS: stream. ARGV: group, worker, entry ids...
_ACK_IF_MINE = """
local n = 0
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if not pending[1] or pending[1][2] == ARGV[2] then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"""

# Heartbeat: reset the idle time of the entries this worker still owns (XCLAIM with idle 0 is not a
# delivery), in one step with the ownership check, so an entry claimed by another worker meanwhile is
# never taken back. KEYS: stream. ARGV: group, worker, entry ids... Returns the ids no longer ours.
_REFRESH = """
local lost = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# Remove a dead worker: its consumer (only when it holds no pending entry) and its registry entry.
# KEYS: stream, workers. ARGV: group, worker. Returns 1 when removed, 0 when it still holds entries.
_PRUNE = """
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if ok and pending[1] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
if ok then redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""
