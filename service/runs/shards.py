"""The worker's side of sampling runs: a shard job's images go to the results store, not to Redis.

The engine runs a shard like any generation job and encodes its images as PNG (lossless: the bytes
decode to the very pixels). The worker hands each finished image of a shard to ``ShardCollector.keep``
instead of storing it in Redis, and when the job finishes, ``ShardCollector.write`` puts the whole shard
in one file (``service.runs.store.write_shard``) before the job's final status is written: "done" in
the record always means the shard file is there. A worker killed before that loses only this shard's
work; the job is reclaimed and run again, and a second delivery of a shard already written writes nothing.
"""
from __future__ import annotations

import io
import logging
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from PIL import Image

from service.jobstore import JobSpec
from service.runs.store import write_shard

log = logging.getLogger("eqm.worker")


class ShardCollector:
    """Images of the shard jobs a worker runs, kept in memory until their shard is complete."""

    def __init__(self, results_root: Path):
        self.root = results_root
        self._specs: dict[str, JobSpec] = {}
        self._images: dict[str, dict[int, tuple[object, object]]] = {}

    def track(self, spec: JobSpec) -> None:
        if spec.results:
            self._specs[spec.id] = spec
            self._images[spec.id] = {}

    def forget(self, job_id: str) -> None:
        self._specs.pop(job_id, None)
        self._images.pop(job_id, None)

    def keep(self, image) -> bool:
        """Take a finished image (``service.engine.ImageOutput``) of a shard job; False for other jobs."""
        if image.job_id not in self._specs:
            return False
        self._images[image.job_id][image.result.index] = (image.data, image.result)
        return True

    def write(self, job) -> str | None:
        """Write the shard of a finished job (``service.engine.JobOutput``); returns an error line, or None
        (also for jobs that are not shards and for cancelled shards, which write nothing)."""
        spec = self._specs.get(job.job_id)
        if spec is None:
            return None
        images = self._images.get(job.job_id, {})
        self.forget(job.job_id)
        if job.status != "done":
            return None
        if len(images) != len(spec.images):
            return f"shard finished with {len(images)} of {len(spec.images)} images"
        pixels, results = [], []
        for index in range(len(spec.images)):
            data, result = images[index]
            pixels.append(_pixels(data.result() if isinstance(data, Future) else data))
            results.append(result)
        arrays = {"images": np.stack(pixels).astype(np.uint8),
                  "labels": np.array([i.labels[0] if i.labels else -1 for i in spec.images], dtype=np.int64),
                  "seeds": np.array([i.seed for i in spec.images], dtype=np.int64),
                  "steps": np.array([r.steps for r in results], dtype=np.int32),
                  "grad_norms": np.array([np.nan if r.grad_norm is None else r.grad_norm for r in results],
                                         dtype=np.float32),
                  "energies": np.array([np.nan if r.energy is None else r.energy for r in results], dtype=np.float32)}
        try:
            wrote = write_shard(self.root / spec.results, arrays)
        except OSError as exc:
            return f"could not write the shard to the results store ({exc})"
        log.info("shard %s: %d images %s", spec.results, len(results), "written" if wrote else "already there")
        return None


def _pixels(png: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8, the pixels the engine encoded (grey images keep one channel)."""
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.array(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels
