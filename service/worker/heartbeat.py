"""The worker's heartbeat: its registry entry, its pending entries kept (fencing), dead workers removed."""
from __future__ import annotations

import json
import logging
import os
import time

import redis

log = logging.getLogger("eqm.worker")


class Heartbeat:
    # -- heartbeat ------------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self.cfg.heartbeat_s):
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("heartbeat: %s", exc)

    def _beat(self) -> None:
        k = self.keys
        with self._lock:
            inflight = dict(self._inflight)
        info = {"device": self.cfg.device, "model": self.model, "models": [self.model],
                "metrics_url": self._metrics_url, "seen": time.time(), "pid": os.getpid(),
                "capacity": self.cfg.capacity, "jobs": len(inflight)}
        # Keep our long jobs from being reclaimed: reset the idle time of the entries still ours (first:
        # XCLAIM works in a full Redis, which refuses the registry write below); the ones another worker
        # claimed meanwhile are dropped by the loop (fencing).
        if inflight:
            lost = {e.decode() for e in self.store.scripts.refresh(keys=[self.stream],
                                                                  args=[k.group, self.name, *inflight.values()])}
            for job_id, entry_id in inflight.items():
                if entry_id in lost:
                    self._lost.put((job_id, "lost"))
            inflight = {j: e for j, e in inflight.items() if e not in lost}
        self.r.hset(k.workers, self.name, json.dumps(info))
        self.metrics.queue_depth.set(self.store.queue_depth(self.model))
        self._beats += 1
        if self._beats % 5 == 1:
            self._prune_dead_workers()
        if not inflight:
            return
        # Backstop for cancel messages lost while the listener reconnected; a record that expired while
        # its job ran ends the job here (nothing is written for it any more, nothing re-creates it).
        pipe = self.r.pipeline(transaction=False)
        for job_id in inflight:
            pipe.hmget(k.job(job_id), "status", "cancel")
        for job_id, (status, flag) in zip(inflight, pipe.execute()):
            if status is None:
                self._lost.put((job_id, "expired"))
            elif flag == b"1":
                self._cancels.put(job_id)

    def _prune_dead_workers(self) -> None:
        """Remove workers silent for longer than ``claim_idle_ms`` (and 10 heartbeats) that hold no pending
        entries any more: their registry entry and their consumer in the group."""
        k = self.keys
        stale_s = max(self.cfg.claim_idle_ms / 1000, 10 * self.cfg.heartbeat_s)
        now = time.time()
        registry = {n.decode(): json.loads(v) for n, v in self.r.hgetall(k.workers).items()}
        try:
            consumers = {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]: c
                         for c in self.r.xinfo_consumers(self.stream, k.group)}
        except redis.ResponseError:
            consumers = {}
        for name in set(registry) | set(consumers):
            if name == self.name:
                continue
            info = registry.get(name)
            if info is not None and now - float(info.get("seen", 0)) <= stale_s:
                continue
            consumer = consumers.get(name)
            if consumer is not None and (consumer["pending"] or consumer["idle"] < stale_s * 1000):
                continue
            if self.store.scripts.prune(keys=[self.stream, k.workers], args=[k.group, name]):
                log.info("pruned dead worker %s", name)
