"""The loop of one worker process: one device, one ``Engine``, jobs from the shared Redis stream.

Run it as ``python -m service.worker --device cuda:0 ...`` (``eqm worker`` starts and supervises one
per device). Any number of workers on any number of machines share one queue by pointing at the
same Redis URL; the keys are those of ``service.jobstore``.

Delivery: at least once; results: exactly once.

- A worker reads entries (XREADGROUP, up to its free sample slots at once) only while its engine has
  room, so jobs spread over workers;
  taking one writes its name in the record's ``worker`` field (the fencing token). The record says
  ``running`` (``started``, ``attempts`` += 1) only once the engine admits the job's first sample.
- Finished images are encoded by a small thread pool off the step loop and stored in step order.
- Every heartbeat it refreshes ``P:workers`` and re-claims its own pending entries (XCLAIM JUSTID
  with idle 0, which does not count as a delivery), so long jobs of a live worker are never taken.
  The same script reports entries another worker claimed meanwhile (e.g. after this one was paused
  past ``claim_idle_ms``): the job is dropped from the engine and nothing more is written for it;
  every write of a job (events, progress, finish, ack) also checks the token in Redis.
- A dead worker's entries go idle; every pass (about once a second) each worker walks the XAUTOCLAIM
  cursor over the whole pending list and takes several (its free slots, at least a quarter of its
  capacity), so they are taken within ``claim_idle_ms`` + one pass whatever the length of the list. A
  reclaimed job goes ahead of the jobs waiting in that worker (it already had its turn), so it restarts
  at the next free slot. It runs again from its seeds, giving the same images; the final status is
  written once (``JobStore.finish``).
- Delivery accounting blames only jobs that were *running* on the dead worker (record ``lost`` += 1
  when reclaimed from it); jobs it had only fetched go back to the queue uncounted. A job lost
  ``max_deliveries`` times goes to ``P:deadletter`` and fails with that reason.
- Dead workers (stale registry entry, no pending entries left) are removed from ``P:workers`` and
  from the consumer group by any live worker.
- A full Redis (OOM under ``noeviction``) is not a crash: the loop stops stepping, keeps its results
  and retries with back-off (0.25 s doubling to 5 s) until Redis takes writes again.
- Cancellation: a listener thread on ``P:cancel`` (backed up by reading the records' ``cancel``
  field every heartbeat) feeds a thread-safe queue that the loop drains before every step.
- SIGTERM/SIGINT: stop reading, let in-flight samples finish for ``grace_s``, then hand unfinished
  jobs back to the queue (re-queued, entry acked) and exit 0. A second signal hands back at once.
- A crash (an exception out of the engine) exits 1 without handing back: the entry stays pending,
  is reclaimed, and a job that keeps crashing workers ends in the dead-letter stream.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from service.engine import PREVIEW_INTERVAL_S, Engine, JobError, StepOutput
from service.jobstore import REDIS_BUSY, JobSpec, JobStore, is_oom
from service.metrics import Metrics, serve_metrics
from service.progress import JobProgress, published_norm_counts
from service.runs.shards import ShardCollector
from service.runs.store import root_of
from service.scoring import SCORE_KIND
from service.worker.cancels import CancelListening
from service.worker.heartbeat import Heartbeat
from service.worker.results import ResultWriting
from service.worker.scores import ScoreJobs
from service.worker_config import WorkerConfig

log = logging.getLogger("eqm.worker")

RESTART_PRIORITY_BOOST = 10   # a reclaimed job is admitted before any job of the API's priorities (0..9)


class SetupError(Exception):
    """A worker that cannot start as configured (e.g. its metrics port is taken): exit 2, no restart."""


def build_engine(cfg: WorkerConfig, metrics: Metrics) -> Engine:
    """Load the checkpoint and codec on the device, warm every bucket, wrap it all in an engine."""
    import torch

    from models import load_model, resolve_checkpoint
    from models.codecs import make_codec
    from models.device import claim_device
    from service.runner import ModelRunner, configure_device_math, model_dtype

    claim_device(cfg.device)        # before any other CUDA call: this process owns this device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = resolve_checkpoint(cfg.checkpoint)
    dtype = model_dtype(cfg.dtype, cfg.device)
    configure_device_math(cfg.device, dtype)
    loaded = load_model(path, device=cfg.device, dtype=dtype, ebm=cfg.ebm or None)
    mc = loaded.spec.config
    codec = make_codec(loaded.spec.codec, channels=mc.in_channels, latent_size=mc.input_size,
                       vae_dir=cfg.vae or None, device=cfg.device)
    runner = ModelRunner.from_loaded(loaded, codec, capacity=cfg.capacity, max_rows=cfg.rows, compile_mode=cfg.compile)
    if cfg.warmup:
        runner.warmup()
    # Images are encoded by two threads off the step loop (PIL releases the GIL while compressing).
    return Engine(runner, model_name=cfg.model_name or Path(cfg.checkpoint).stem, metrics=metrics,
                  encode_pool=ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode"))


class Worker(CancelListening, Heartbeat, ResultWriting, ScoreJobs):
    """The loop of one worker process (see the module docstring)."""

    def __init__(self, cfg: WorkerConfig, engine: Engine | None = None, metrics: Metrics | None = None):
        self.cfg = cfg
        self.name = cfg.name or f"{socket.gethostname()}:{os.getpid()}:{cfg.device}"
        self.metrics = metrics or (engine.metrics if engine is not None else Metrics())
        self.engine = engine
        self.r = redis.Redis.from_url(cfg.redis_url, health_check_interval=30)
        self.store = JobStore(self.r, cfg.key_prefix, cfg.result_ttl_s)
        self.keys = self.store.keys
        # The model this worker serves: the engine's, or the name build_engine will give it.
        self.model = engine.model_name if engine is not None else cfg.model_name or Path(cfg.checkpoint).stem
        self.stream = self.keys.stream_for(self.model)               # this worker reads its model's jobs only
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._inflight: dict[str, str] = {}            # job id -> stream entry id
        self._lock = threading.Lock()                  # guards _inflight against the heartbeat thread
        self._progress: dict[str, JobProgress] = {}
        self._last_progress: dict[str, float] = {}
        self._unwritten: list[StepOutput] = []         # results whose Redis writes failed, retried
        self._stop = threading.Event()                 # a stop was asked (signal or parent gone)
        self._hurry = threading.Event()                # hand back now, no grace
        self._closed = threading.Event()               # threads end
        self._next_autoclaim = 0.0
        self._metrics_url = ""
        self._calibration: tuple | None = None         # (Calibration | None,) once loaded, for score jobs
        self._previews_checked = 0.0                    # last look at which jobs clients preview
        self._lost: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()   # (job, "lost" | "expired")
        self._dropped: set[str] = set()                # jobs still in the engine that we write nothing for
        self._started: set[str] = set()                # jobs whose record says running (by us)
        self._reclaimed: set[str] = set()              # jobs taken from a dead worker's pending entries
        self._backoff_s = 0.0                          # Redis refusing writes (OOM): current back-off
        self._beats = 0
        self._shards = ShardCollector(root_of(cfg.results_dir))   # sampling-run shards: images to the store

    # -- lifecycle ------------------------------------------------------------------------------
    def request_stop(self, hurry: bool = False) -> None:
        if self._stop.is_set() or hurry:
            self._hurry.set()
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())

    def run(self) -> int:
        if self.engine is None:
            self.engine = build_engine(self.cfg, self.metrics)
        if self.cfg.metrics_port:
            try:
                serve_metrics(self.metrics, self.cfg.metrics_port, self.cfg.metrics_host)
            except OSError as exc:     # a setup error: exit 2, so the supervisor stops instead of restart-looping
                raise SetupError(f"metrics port {self.cfg.metrics_port} on {self.cfg.metrics_host}: {exc.strerror or exc}; "
                                 "pass another --metrics-port") from None
            host = self.cfg.metrics_host if self.cfg.metrics_host not in ("", "0.0.0.0", "::") else socket.gethostname()
            self._metrics_url = f"http://{host}:{self.cfg.metrics_port}/metrics"
        while not self._stop.is_set():
            try:
                self.store.ensure_group(self.model)
                self._beat()
                break
            except REDIS_BUSY as exc:
                self._back_off(exc)
        threads = [threading.Thread(target=self._listen_cancels, name="cancel-listener", daemon=True),
                   threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)]
        for t in threads:
            t.start()
        log.info("worker %s ready: %s on %s, capacity %d samples / %d rows", self.name, self.engine.model_name,
                 self.cfg.device, self.engine.runner.capacity, self.engine.runner.max_rows)
        try:
            self._loop()
            self._hand_back()
            try:        # nothing of ours is pending now: leave the consumer group tidy
                self.r.xgroup_delconsumer(self.stream, self.keys.group, self.name)
            except redis.RedisError:
                pass
        finally:
            self._closed.set()
            for t in threads:
                t.join(timeout=2)
            try:
                self.r.hdel(self.keys.workers, self.name)
            except redis.RedisError:
                pass
        log.info("worker %s stopped", self.name)
        return 0

    def _loop(self) -> None:
        engine = self.engine
        drain_until = None
        while True:
            if self.cfg.parent_pid and os.getppid() != self.cfg.parent_pid:
                self.request_stop()
            if self._stop.is_set() and drain_until is None:
                drain_until = time.monotonic() + self.cfg.grace_s
                log.info("stopping: no new jobs; %d in flight get %.0fs to finish", len(engine.job_ids()), self.cfg.grace_s)
            if drain_until is not None and (not engine.has_work or self._hurry.is_set() or time.monotonic() > drain_until):
                self._unwritten.append(engine.flush())     # images that finished but were not out yet
                self._flush_unwritten()
                return
            self._drain_cancels()
            if self._unwritten:           # Redis refused results (down or full): keep them, step no further
                self._flush_unwritten()
                continue
            if drain_until is None:
                self._guarded(self._reclaim_due)
            if drain_until is None and self._wants_more():
                self._guarded(self._fetch, 0 if engine.has_work else 500)
            if engine.has_work:
                self._guarded(self._refresh_previews)
                out = engine.step()
                self._unwritten.append(out)
            # Results whose images are still being encoded wait, unless there is nothing else to do.
            if self._unwritten:
                self._flush_unwritten(wait=not engine.has_work)

    def _refresh_previews(self) -> None:
        """Which running jobs a client follows with previews (one pipelined EXISTS per job, at most
        every ``PREVIEW_INTERVAL_S``); the engine decodes previews for those only."""
        now = time.monotonic()
        if now - self._previews_checked < PREVIEW_INTERVAL_S:
            return
        self._previews_checked = now
        jobs = self.engine.job_ids()
        if not jobs:
            self.engine.preview_jobs = set()
            return
        pipe = self.r.pipeline(transaction=False)
        for job_id in jobs:
            pipe.exists(self.keys.previews(job_id))
        self.engine.preview_jobs = {j for j, on in zip(jobs, pipe.execute()) if on}

    def _guarded(self, fn, *args) -> None:
        """Redis calls of the loop: a lost connection or a full Redis is logged and retried, not fatal."""
        try:
            fn(*args)
            self._backoff_s = 0.0
        except REDIS_BUSY as exc:
            self._back_off(exc)

    def _back_off(self, exc: Exception) -> None:
        if isinstance(exc, redis.ResponseError) and not is_oom(exc):
            raise exc
        self._backoff_s = min(5.0, max(0.25, 2 * self._backoff_s))
        what = "out of memory (maxmemory reached)" if is_oom(exc) else f"unreachable ({exc})"
        log.warning("redis %s; retrying in %.2fs", what, self._backoff_s)
        time.sleep(self._backoff_s)

    # -- taking jobs ----------------------------------------------------------------------------
    def _wants_more(self) -> bool:
        """Keep a backlog of about one batch, and at least two jobs to take turns, no more:
        the rest stays in the stream for other workers."""
        sched = self.engine.scheduler
        return sched.num_waiting < sched.capacity or sched.num_waiting_jobs < 2

    def _free_capacity(self) -> int:
        """Jobs to read at once: the sample slots neither running nor already waiting (at least 1)."""
        sched = self.engine.scheduler
        return max(1, sched.capacity - sched.num_running - sched.num_waiting)

    def _fetch(self, block_ms: int) -> None:
        k = self.keys
        reply = self._xcall(self.r.xreadgroup, k.group, self.name, {self.stream: ">"}, count=self._free_capacity(),
                            block=block_ms or None)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._take(entry_id.decode(), fields, reclaimed=False)

    def _reclaim_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_autoclaim:
            self._next_autoclaim = now + min(1.0, self.cfg.claim_idle_ms / 4000)   # reclaim within idle + 1 pass
            self._reclaim()

    def _reclaim(self) -> int:
        """Take idle entries of dead workers: up to the free slots, and a quarter of the capacity even when
        full (a restarted job goes ahead of the jobs waiting here, see ``_take``). XAUTOCLAIM looks at no
        more than 10 x COUNT pending entries per call: walk its cursor to the end of the list, so entries
        behind a live worker's (kept fresh by its heartbeat) are reached too."""
        k = self.keys
        sched = self.engine.scheduler
        want = max(1, sched.capacity // 4, sched.capacity - sched.num_waiting - sched.num_running)
        cursor, taken = "0-0", 0
        while taken < want:
            reply = self._xcall(self.r.xautoclaim, self.stream, k.group, self.name, min_idle_time=self.cfg.claim_idle_ms,
                                start_id=cursor, count=want - taken)
            if not reply:
                break
            for entry_id, fields in reply[1]:
                self._take(entry_id.decode(), fields, reclaimed=True)
                taken += 1
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if cursor == "0-0":
                break
        return taken

    def _xcall(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.store.ensure_group(self.model)       # the stream or group was deleted under us
            return None

    def _take(self, entry_id: str, fields: dict | None, reclaimed: bool) -> None:
        k = self.keys
        if not fields or b"id" not in fields:
            self._ack(entry_id)             # deleted or malformed entry: nothing to run
            return
        job_id = fields[b"id"].decode()
        if job_id in self.engine.job_ids():
            return                          # our own entry came back idle: keep running it
        # One script: a cancel, a finish or an expiry landing between a read and a write here could
        # otherwise be overwritten; it also counts the loss when the job was running on a dead worker.
        state, spec_json, lost = self.store.scripts.take(
            keys=[k.job(job_id), k.queued, k.queued_for(self.model)],
            args=[self.name, job_id, "1" if reclaimed else "0", self.cfg.max_deliveries])
        state = state.decode()
        if state in ("missing", "final"):
            self._ack(entry_id)             # expired, or finished by an earlier delivery
            return
        if state == "cancel":
            self.store.finish(job_id, "cancelled")
            self.metrics.jobs_total.labels(self.model, "cancelled").inc()
            self._ack(entry_id)
            return
        if state == "dead":
            reason = (f"dead-lettered: the worker running it stopped or crashed {int(lost)} times "
                      f"(limit {self.cfg.max_deliveries})")
            log.warning("job %s %s", job_id, reason)
            self.r.xadd(k.deadletter, {"id": job_id, "model": self.model, "reason": reason})
            self._fail(job_id, entry_id, reason)
            return
        try:
            spec = JobSpec.from_json(spec_json)
            if spec.kind == SCORE_KIND:            # one batched forward, no sampling: done right here
                self._score(job_id, entry_id, spec)
                return
            if reclaimed:       # it waited its turn once and lost it to a crash: ahead of the jobs waiting here
                spec.priority += RESTART_PRIORITY_BOOST
            upload = self.r.get(k.input(job_id)) if spec.kind in ("denoise", "inpaint") else None
            self.engine.add_job(spec, upload)
            self._shards.track(spec)
        except (JobError, ValueError, TypeError, KeyError) as exc:
            self._fail(job_id, entry_id, f"invalid job: {exc}")
            return
        with self._lock:
            self._inflight[job_id] = entry_id
        # A job that ran before (reclaimed, or requeued at a stop) repeats evaluations it already published.
        earlier = published_norm_counts(self.r.xrange(k.events(job_id)), len(spec.images))
        self._progress[job_id] = JobProgress(len(spec.images), earlier)
        self._last_progress[job_id] = time.monotonic()
        if reclaimed:
            self._reclaimed.add(job_id)
        log.info("job %s: %s, %d images%s", job_id, spec.kind, len(spec.images), " (reclaimed)" if reclaimed else "")

    def _mark_started(self, out: StepOutput) -> None:
        """Jobs whose first samples the engine admitted in this step now run: say so in the record
        (one script, which also notices a job cancelled, finished, expired or taken over meanwhile)."""
        k = self.keys
        ids = {p.job_id for p in out.progress} | {i.job_id for i in out.images} | {j.job_id for j in out.jobs}
        for job_id in ids - self._started - self._dropped:
            now = time.time()
            data = json.dumps({"id": job_id, "worker": self.name, "time": now,
                               "reclaimed": job_id in self._reclaimed})
            state = self.store.scripts.start(keys=[k.job(job_id), k.queued, k.events(job_id)],
                                             args=[repr(now), self.name, job_id, self.cfg.result_ttl_s, data]).decode()
            if state == "started":
                self._started.add(job_id)
            elif state == "cancel":
                self._started.add(job_id)
                self.engine.cancel(job_id)
            else:                           # final, expired or another worker's now: write nothing more
                self._drop(job_id, ack=state != "lost", why=state)

    def _drop(self, job_id: str, ack: bool, why: str) -> None:
        """Stop a job here and write nothing more for it (its record is final, gone, or another worker's)."""
        if self.engine.cancel(job_id):      # its samples leave at the next step; forget it when it is out
            self._dropped.add(job_id)
        self._shards.forget(job_id)
        with self._lock:
            entry_id = self._inflight.pop(job_id, None)
        if ack and entry_id is not None:
            self._ack(entry_id)
        log.warning("job %s: dropped (%s)", job_id,
                    "claimed by another worker" if why == "lost" else f"record {why}")

    def _fail(self, job_id: str, entry_id: str, error: str) -> None:
        self.store.finish(job_id, "failed", error=error)
        self.metrics.jobs_total.labels(self.model, "failed").inc()
        self._ack(entry_id)

    def _ack(self, entry_id: str) -> None:
        """Ack and delete the entry, unless another worker claimed it meanwhile (that claim stands)."""
        self.store.scripts.ack(keys=[self.stream], args=[self.keys.group, self.name, entry_id])
