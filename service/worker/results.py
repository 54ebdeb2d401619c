"""The worker's writes: results in step order, events and progress, fenced by its name; acks and hand-backs."""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from dataclasses import asdict

from service.engine import StepOutput
from service.jobstore import REDIS_BUSY
from service.progress import JobProgress

log = logging.getLogger("eqm.worker")


class ResultWriting:
    # -- results --------------------------------------------------------------------------------
    def _flush_unwritten(self, wait: bool = True) -> None:
        """Write finished steps in order; ``wait=False`` stops at the first whose images are still encoding."""
        while self._unwritten:
            if not wait and not all(_ready(img.data) for img in self._unwritten[0].images):
                return
            out = self._without_dropped(self._unwritten[0])
            try:
                self._mark_started(out)
                self._write(out)
                self._backoff_s = 0.0
            except REDIS_BUSY as exc:
                log.warning("could not store results (%s)", type(exc).__name__)
                self._back_off(exc)
                return
            self._unwritten.pop(0)

    def _without_dropped(self, out: StepOutput) -> StepOutput:
        """The step's output less the jobs this worker writes nothing for (taken over, final or gone)."""
        if not self._dropped:
            return out
        for job in out.jobs:
            if job.job_id in self._dropped:           # the engine let go of it: forget it
                self._dropped.discard(job.job_id)
                self._progress.pop(job.job_id, None)
                self._last_progress.pop(job.job_id, None)
                self._started.discard(job.job_id)
        keep = lambda job_id: job_id not in self._dropped and job_id in self._progress    # noqa: E731
        return StepOutput(images=[i for i in out.images if keep(i.job_id)],
                          jobs=[j for j in out.jobs if keep(j.job_id)],
                          progress=[p for p in out.progress if keep(p.job_id)], rows=out.rows, seconds=out.seconds)

    def _write(self, out: StepOutput) -> None:
        k, ttl = self.keys, self.cfg.result_ttl_s
        now_m, now = time.monotonic(), time.time()
        pipe = self.r.pipeline(transaction=False)
        touched: set[str] = set()
        published: list[tuple[JobProgress, int | None]] = []      # norms to forget once written
        for img in out.images:
            if self._shards.keep(img):          # a sampling-run shard: written to the results store at its end
                continue
            idx = img.result.index
            pipe.set(k.image(img.job_id, idx), img.data.result() if isinstance(img.data, Future) else img.data, ex=ttl)
            prog = self._progress.get(img.job_id)
            norms = prog.finish(idx, img.result.steps, img.result.grad_norm, img.result.stopped_early) if prog else []
            published += [(prog, idx)] if prog else []
            # ``ready:<k>`` in the record (status reads need no EXISTS per image), after the bytes
            self._event(pipe, img.job_id, "image", {"id": img.job_id, **asdict(img.result), "norms": norms},
                        mark=f"ready:{idx}")
        for p in out.progress:
            prog = self._progress.get(p.job_id)
            if prog is not None and prog.update(p.index, p.steps, p.grad_norm):
                touched.add(p.job_id)
                if p.preview is not None:
                    prog.preview(p.index, p.preview)
        for job_id in touched:
            if now_m - self._last_progress.get(job_id, 0.0) >= self.cfg.progress_interval_s:
                self._last_progress[job_id] = now_m
                prog = self._progress[job_id]
                self._event(pipe, job_id, "progress", {"id": job_id, "time": now, "images": prog.event_images()},
                            progress=json.dumps(prog.summary()))
                published.append((prog, None))
        pipe.execute()
        for prog, index in published:
            prog.sent(index)
        # Images are stored before the final status, so "done" always means the images are there.
        for job in out.jobs:
            prog = self._progress.get(job.job_id)
            shard_error = self._shards.write(job)       # the shard file before "done"; None for other jobs
            written = self.store.finish(job.job_id, "failed" if shard_error else job.status, error=shard_error,
                                        images=job.images, worker=self.name,
                                        progress=json.dumps(prog.summary() if prog else []))
            with self._lock:
                entry_id = self._inflight.pop(job.job_id, None)
            if entry_id is not None and written >= 0:      # -1: another worker holds it now; its entry stays
                self._ack(entry_id)
            self._started.discard(job.job_id)
            self._reclaimed.discard(job.job_id)
            self._progress.pop(job.job_id, None)
            self._last_progress.pop(job.job_id, None)
            log.info("job %s: %s in %.2fs", job.job_id, job.status, job.latency_s)

    def _event(self, pipe, job_id: str, event: str, data: dict, progress: str | None = None,
               mark: str | None = None) -> None:
        """An event (and the record's progress, or a ``mark`` field set to 1) in the pipeline, written only
        while this worker holds the job and its record exists: an expired record is never re-created."""
        self.store.publish(job_id, event, data, worker=self.name, progress=progress, mark=mark, client=pipe)

    def _hand_back(self) -> None:
        """Put unfinished jobs back in the queue for another worker (graceful stop only)."""
        with self._lock:
            inflight = dict(self._inflight)
            self._inflight.clear()
        for job_id, entry_id in inflight.items():
            requeued = self.store.scripts.hand_back(keys=[self.keys.job(job_id), self.stream, self.keys.queued],
                                                    args=[self.keys.group, entry_id, job_id, self.name])
            if requeued:
                self.store.publish(job_id, "queued", {"id": job_id, "time": time.time(), "handed_back": self.name})
            log.info("job %s: %s", job_id, "handed back to the queue" if requeued else "already final")


def _ready(data) -> bool:
    return not isinstance(data, Future) or data.done()
