"""The API's side of sampling runs: a thread that keeps every running run moving.

Each pass (``tick``) looks at every run the store holds with status ``running`` and, for each of its shards:
- done once its file and checksum are in the store (the worker writes them before the job's "done");
- in flight while its job is queued or running (reclaim, dead letters and restarts are the queue's);
- submitted again when its job is gone (Redis lost it), finished without a file, cancelled by someone
  else, or failed (up to ``MAX_SHARD_FAILURES`` times; then the run fails and says which shard). A job
  dead-lettered because the workers running it died is a loss, not an error: killed workers never fail a
  run, unless the same shard keeps killing them (``MAX_SHARD_LOSSES`` dead letters).
Only a few shards of a run are in the queue at once (``shards_per_worker`` per live worker of the model:
one running, one waiting), so a worker's backlog never holds more than its next shard and an interactive
request is read from the stream at once (it then goes first: its priority is higher); a cancel has little
to take back. When every shard is done the run is assembled
(``store.assemble``) and judged (``service.runs.report``).

All state lives in the run record on disk, so the keeper of a restarted API picks up where the last
stopped: a full-stack restart (embedded Redis with ``--redis-dir``, or an external Redis) continues
from the shards not yet done. A keeper advances only the runs its Redis knows (``P:run:<id>``, no TTL):
several deployments may share one results store without taking each other's runs. After a Redis that
lost everything, ``resume`` (``POST /v1/sampling-runs/{id}/resume``) adopts the run again and its
missing shards are submitted again.
Several API processes may run keepers: a short Redis lease per run lets one of them advance it at a time.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from service.jobstore import JobStore, worker_serves
from service.runs import store as results
from service.runs.batches import BatchKeeper
from service.runs.plan import shard_job
from service.runs.report import evaluate

log = logging.getLogger("eqm.runs")

MAX_SHARD_FAILURES = 3        # a shard whose job failed (an error) this often fails its run
MAX_SHARD_LOSSES = 10         # dead-lettered this often (each = max_deliveries worker deaths): a poison shard
LEASE_S = 10                  # a keeper holds a run this long per pass (renewed each pass)


class RunMetrics:
    """Prometheus series of sampling runs, in the API's registry."""

    def __init__(self, registry: CollectorRegistry):
        self.in_progress = Gauge("eqm_sampling_runs_in_progress", "sampling runs neither done, failed nor cancelled",
                                 registry=registry)
        self.shards = Counter("eqm_sampling_run_shards_total", "shards of sampling runs by outcome",
                              ["model", "outcome"], registry=registry)
        self.images_per_second = Gauge("eqm_sampling_run_images_per_second",
                                       "images per second of the model's running sampling runs",
                                       ["model"], registry=registry)


class RunKeeper:
    def __init__(self, root: Path, store: JobStore, metrics: RunMetrics | None = None, *, window: int | None = None,
                 shards_per_worker: int = 2, heartbeat_s: float = 2.0, interval_s: float = 0.5, name: str = ""):
        self.root, self.store, self.metrics = root, store, metrics
        self.fixed_window, self.shards_per_worker, self.heartbeat_s = window, shards_per_worker, heartbeat_s
        self.interval_s = interval_s
        self.name = name or f"keeper-{id(self):x}"
        self._lock = threading.Lock()            # one pass at a time in this process (thread and handlers)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._final: set[str] = set()            # runs seen final: not read again at every pass
        self.batches = BatchKeeper(root, store)  # OpenAI batches move on the same thread

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "RunKeeper":
        self._thread = threading.Thread(target=self._loop, name="run-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:                      # Redis down, disk trouble: log and keep trying
                log.exception("sampling-run keeper pass failed")

    # -- one pass -----------------------------------------------------------------------------
    def tick(self) -> None:
        with self._lock:
            self.batches.tick()
            running, rates = 0, {}
            for run_id in results.run_ids(self.root):
                if run_id in self._final:
                    continue
                record = results.load_run(self.root, run_id)
                if record is None or record["status"] != "running":
                    if record is not None and record["status"] == "done":
                        self._final.add(run_id)      # cancelled and failed runs may be resumed elsewhere
                    continue
                if not self.store.r.exists(self._marker(run_id)):
                    continue                         # another deployment's run, or its Redis was lost: resume
                running += 1
                if self._lease(run_id):
                    self.advance(record)
                    if record["status"] == "running":
                        rate = progress(record)["images_per_second"] or 0.0
                        rates[record["model"]] = rates.get(record["model"], 0.0) + rate
            if self.metrics is not None:
                self.metrics.in_progress.set(running)
                for model, rate in rates.items():
                    self.metrics.images_per_second.labels(model).set(rate)

    def _marker(self, run_id: str) -> str:
        return f"{self.store.keys.prefix}:run:{run_id}"

    def _lease(self, run_id: str) -> bool:
        key = f"{self.store.keys.prefix}:run-lease:{run_id}"
        holder = self.store.r.get(key)
        if holder is not None and holder.decode() != self.name:
            return False
        return bool(self.store.r.set(key, self.name, ex=LEASE_S, nx=holder is None, xx=holder is not None))

    def advance(self, record: dict) -> None:
        """Bring one running run's record up to date, submit shards up to the window, assemble when done."""
        changed = False
        inflight = 0
        window = self._window(record["model"])
        for shard in record["shards"]:
            if shard["done"]:
                continue
            path = results.shard_path(self.root, record["id"], shard["index"])
            if results.shard_done(path):
                self._mark_done(record, shard, path)
                changed = True
                continue
            if shard["job"] is None:
                continue
            job = self.store.get(shard["job"])
            status = job["status"] if job else None
            if status in ("queued", "running"):
                inflight += 1
                continue
            if status == "done" and results.shard_done(path):     # its file landed since the look above
                self._mark_done(record, shard, path)
                changed = True
                continue
            if status == "failed":
                lost = (job.get("error") or "").startswith("dead-lettered")
                shard["lost" if lost else "failures"] = shard.get("lost" if lost else "failures", 0) + 1
                self._count(record, "lost" if lost else "failed")
                log.warning("run %s shard %d failed (%s)", record["id"], shard["index"], job.get("error"))
                if shard["failures"] >= MAX_SHARD_FAILURES or shard.get("lost", 0) >= MAX_SHARD_LOSSES:
                    record.update(status="failed", finished=time.time(),
                                  error=f"shard {shard['index']} failed {shard['failures']} times and was lost with "
                                        f"its workers {shard.get('lost', 0)} times; last: {job.get('error')}")
                    results.save_run(self.root, record)
                    self._cancel_inflight(record)
                    return
            shard["job"] = None            # gone, failed, cancelled elsewhere, or done without a file: again
            changed = True
        for shard in record["shards"]:
            if inflight >= window:
                break
            if not shard["done"] and shard["job"] is None:
                shard["attempts"] += 1
                spec = shard_job(record, shard)
                self.store.submit(spec)
                shard["job"] = spec.id
                inflight += 1
                changed = True
        if all(s["done"] for s in record["shards"]):
            self._finish(record)
            changed = True
        if changed:
            now = results.load_run(self.root, record["id"])
            if now is not None and now["status"] != "running" and record["status"] == "running":
                record.update(status=now["status"], finished=now["finished"])   # cancelled by another process
            results.save_run(self.root, record)

    def _window(self, model: str) -> int:
        if self.fixed_window is not None:
            return self.fixed_window
        live = sum(1 for w in self.store.live_workers(self.heartbeat_s).values() if worker_serves(w, model))
        return self.shards_per_worker * max(1, live)

    def _mark_done(self, record: dict, shard: dict, path: Path) -> None:
        with np.load(path, allow_pickle=False) as z:
            shard["nfe"] = int(z["steps"].astype(np.int64).sum())
        shard.update(done=True, done_at=time.time(), job=shard["job"])
        self._count(record, "done")

    def _finish(self, record: dict) -> None:
        try:
            samples, _ = results.assemble(self.root, record)
        except results.StoreError as exc:          # a damaged shard was removed: it runs again
            log.warning("run %s: %s; running it again", record["id"], exc)
            for shard in record["shards"]:
                if not results.shard_done(results.shard_path(self.root, record["id"], shard["index"])):
                    shard.update(done=False, job=None)
            return
        record.update(status="done", finished=time.time())
        record["report"] = evaluate(samples, record)
        log.info("run %s done: %d images in %s", record["id"], record["num_samples"], samples)

    def _count(self, record: dict, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.shards.labels(record["model"], outcome).inc()

    # -- control ------------------------------------------------------------------------------
    def submit(self, record: dict) -> None:
        """Store a new run and queue its first shards."""
        with self._lock:
            results.save_run(self.root, record)
            self.store.r.set(self._marker(record["id"]), "1")
            self.advance(record)

    def cancel(self, run_id: str) -> dict | None:
        """Stop scheduling shards and cancel those in flight; what is done stays."""
        with self._lock:
            record = results.load_run(self.root, run_id)
            if record is None or record["status"] != "running":
                return record
            record.update(status="cancelled", finished=time.time())
            results.save_run(self.root, record)
            self._cancel_inflight(record)
            return record

    def resume(self, run_id: str) -> dict | None:
        """A cancelled or failed run, or a running one whose Redis was lost, goes on from the shards not yet done."""
        with self._lock:
            record = results.load_run(self.root, run_id)
            if record is None or record["status"] not in ("cancelled", "failed", "running"):
                return record
            self.store.r.set(self._marker(run_id), "1")
            for shard in record["shards"]:
                shard["failures"] = 0
            record.update(status="running", finished=None, error=None)
            results.save_run(self.root, record)
            self.advance(record)
            return record

    def _cancel_inflight(self, record: dict) -> None:
        for shard in record["shards"]:
            if shard["job"] and not shard["done"]:
                self.store.cancel(shard["job"])


def progress(record: dict) -> dict:
    """done/total, images/s, ETA, NFE so far and failures of a run, from its record alone."""
    done_shards = [s for s in record["shards"] if s["done"]]
    done = sum(s["count"] for s in done_shards)
    total = record["num_samples"]
    last = max((s["done_at"] for s in done_shards if s["done_at"]), default=None)
    elapsed = (last - record["created"]) if last else 0.0
    rate = done / elapsed if elapsed > 0 else None
    eta = (total - done) / rate if rate and record["status"] == "running" else None
    return {"done": done, "total": total, "shards_done": len(done_shards), "shards_total": len(record["shards"]),
            "shards_failed": sum(s["failures"] for s in record["shards"]),
            "shards_lost": sum(s.get("lost", 0) for s in record["shards"]),
            "images_per_second": None if rate is None else round(rate, 3),
            "eta_s": None if eta is None else round(eta, 1), "nfe": sum(s["nfe"] for s in done_shards)}
