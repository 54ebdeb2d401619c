"""Score jobs: the energy or gradient norm of uploaded images, written with the job's final status."""
from __future__ import annotations

import json
import logging

from service.jobstore import ImageResult, JobSpec
from service.scoring import Calibration, calibration_path, run_score_job

log = logging.getLogger("eqm.worker")


class ScoreJobs:
    # -- score jobs -----------------------------------------------------------------------------
    def _score(self, job_id: str, entry_id: str, spec: JobSpec) -> None:
        if self._calibration is None:
            from models import resolve_checkpoint
            self._calibration = (Calibration.load(calibration_path(resolve_checkpoint(self.cfg.checkpoint))),)
        scores = run_score_job(self.r, self.keys.prefix, spec, self.engine.runner, self.engine.null_label,
                               self._calibration[0])
        results = [ImageResult(index=s["index"], steps=0, grad_norm=s["grad_norm"], stopped_early=False,
                               energy=s.get("energy"))
                   for s in scores]
        # The scores go in with the final status (one fenced write): a job cancelled, expired or taken
        # over meanwhile gets neither.
        if self.store.finish(job_id, "done", images=results, worker=self.name,
                             extra={"scores": json.dumps(scores)}) == 1:
            self.metrics.jobs_total.labels(self.model, "done").inc()
        self._ack(entry_id)
