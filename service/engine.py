"""The worker engine: continuous batching of EqM samples, ``step()`` = schedule -> run -> update.

EqM has no timestep, so a sample's whole state is its slot in the runner's ``SlotBatch``; samples
join and leave the running batch at any step and the batch never drains to take new work. One
step:

1. ``Scheduler.schedule(now)``: samples of cancelled / past-deadline jobs leave, waiting samples
   enter free slots (priority, then round-robin between jobs, within the row budget);
2. ``ModelRunner.execute``: frees and admits slots, one forward on the active rows, one fused
   NAG-GD step, one read-back of steps / gradient norms / finished flags;
3. ``Scheduler.update``: samples below their threshold or at their step cap finish; the runner
   retires them (their latents gathered and decoded in one batch on the device) and they are
   emitted: encoded (PNG/JPEG/WebP) and their jobs resolved. On CUDA that emission happens in the
   next step, after its work is queued (``ModelRunner.emit_lag``), so waiting for the copies never
   leaves the device idle; elsewhere in the same step.

Results are per sample and do not depend on what else shares the batch: a sample's start is
``noise_for_seed(seed)`` (or its encoded upload), every row is evaluated independently by the model
and the fused step touches only that sample's rows, so the same request and seed give the same
image (to float rounding of batched matmuls) whatever else runs beside it.

No I/O happens here: the worker turns ``StepOutput`` into Redis writes, the benchmark into numbers.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from models.inpaint import MaskError, composite, latent_hold
from models.sampler import MAX_ROWS_PER_SAMPLE, Condition, SamplerParams, condition_rows
from service.images import ImageError, content_type, decode_image, encode_image, provenance_record
from service.jobstore import IMAGE_FORMATS, JOB_KINDS, ImageResult, JobSpec
from service.metrics import Metrics
from service.runner import ModelRunner, Retired, SampleInput
from service.scheduler import JobRequest, SampleKey, SampleRequest, Scheduler

PREVIEW_INTERVAL_S = 0.3     # a previewed job's iterates are decoded at most this often


class JobError(ValueError):
    """A job the engine cannot run as specified (one-line message, stored as the job's error)."""


@dataclass
class ImageOutput:
    job_id: str
    result: ImageResult
    data: bytes | Future | None      # encoded image (a Future with an encode pool; None when not encoding)
    latent: torch.Tensor             # (C, H, W) float32 final iterate, on CPU


@dataclass
class JobOutput:
    job_id: str
    status: str                      # "done" or "cancelled"
    images: list[ImageResult]        # by index; a cancelled job lists the images finished before
    latency_s: float                 # from submission to its last image


@dataclass
class Progress:
    job_id: str
    index: int
    steps: int
    grad_norm: float | None
    preview: str | None = None       # data:image/png;base64 URL of the current iterate (previewed jobs only)


@dataclass
class StepOutput:
    images: list[ImageOutput] = field(default_factory=list)
    jobs: list[JobOutput] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)   # every sample still running
    rows: int = 0                                            # rows of running samples (NFE of this step)
    bucket_rows: int = 0                                     # rows the forward ran on (rows + padding)
    seconds: float = 0.0


@dataclass
class _Departure:
    """A sample leaving the engine in this step, for whatever reason."""

    key: SampleKey
    reason: str                      # converged | step_cap | deadline | cancelled (= the metric outcome)
    steps: int
    grad_norm: float
    latent: torch.Tensor | None      # None when cancelled
    energy: float | None = None      # final energy where the model has one (retired samples)


@dataclass
class _Job:
    spec: JobSpec
    submitted: float
    results: dict[int, ImageResult] = field(default_factory=dict)
    resolved: int = 0
    cancelled: bool = False


class Engine:
    """Continuous-batching sampler of one device; feed it with ``add_job``, drive it with ``step``."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler | None = None, *, model_name: str = "model",
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 encode_images: bool = True, max_upload_pixels: int = 16_000_000,
                 encode_pool: Executor | None = None):
        self.runner = runner
        self.scheduler = scheduler or Scheduler(runner.capacity, runner.max_rows)
        self.model_name = model_name
        self.metrics = metrics or Metrics()
        self.metrics.precreate(model_name)
        self.clock = clock
        self.encode_images = encode_images
        # With a pool, images are encoded (PNG/JPEG/WebP, milliseconds each at 256 px) off the step loop.
        self.encode_pool = encode_pool
        self.max_upload_pixels = max_upload_pixels
        cfg = runner.model.config
        self.num_classes, self.null_label = cfg.num_classes, cfg.null_label
        self._jobs: dict[str, _Job] = {}
        self._inputs: dict[SampleKey, SampleInput] = {}
        self._unemitted: list[tuple[list[_Departure], Retired]] = []    # departures of earlier steps, in order
        self._inpaint: dict[str, tuple] = {}    # inpaint job -> (input pixels, regenerate mask): composited back
        # Live previews: jobs some client follows with ?previews=true (the worker keeps the set current);
        # each gets its running images' iterates at most every ``preview_interval_s``, others cost nothing.
        self.preview_jobs: set[str] = set()
        self.preview_interval_s = PREVIEW_INTERVAL_S
        self._last_preview: dict[str, float] = {}

    # -- input ----------------------------------------------------------------------------------
    def add_job(self, spec: JobSpec, input_image: bytes | None = None) -> None:
        """Validate a job and queue its samples; raises ``JobError`` for a job that cannot run."""
        if spec.id in self._jobs:
            raise JobError(f"job {spec.id} is already running here")
        inputs = self._sample_inputs(spec, input_image)
        max_steps = inputs[0].params.max_steps
        samples = [SampleRequest(i.key, len(i.rows), max_steps) for i in inputs]
        try:
            self.scheduler.add_job(JobRequest(spec.id, samples, priority=spec.priority, deadline=spec.deadline))
        except ValueError as exc:
            self._inpaint.pop(spec.id, None)
            raise JobError(str(exc)) from None
        self._jobs[spec.id] = _Job(spec, submitted=spec.submitted)
        self._inputs.update((i.key, i) for i in inputs)

    def _sample_inputs(self, spec: JobSpec, input_image: bytes | None) -> list[SampleInput]:
        if spec.kind not in JOB_KINDS:
            raise JobError(f"job kind must be one of {', '.join(JOB_KINDS)}, not {spec.kind!r}")
        if not spec.images:
            raise JobError("a job needs at least one image")
        if spec.format not in IMAGE_FORMATS:
            raise JobError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, not {spec.format!r}")
        try:
            params = SamplerParams(**asdict(spec.sampler))
        except (TypeError, ValueError) as exc:
            raise JobError(f"sampler settings: {exc}") from None
        base, hold = None, None
        if spec.kind in ("denoise", "inpaint"):
            if input_image is None:
                raise JobError(f"a {spec.kind} job needs an input image and none was stored")
            if spec.noise_level is not None and not 0.0 <= spec.noise_level <= 1.0:
                raise JobError(f"noise level must be in [0, 1], got {spec.noise_level}")
            try:
                pixels = decode_image(input_image, self.runner.image_size, self.runner.channels,
                                      self.max_upload_pixels)
            except ImageError as exc:
                raise JobError(str(exc)) from None
            if spec.kind == "inpaint":
                regenerate = self._mask(spec, pixels)
                try:
                    hold = latent_hold(self.runner.codec, pixels, regenerate)
                except MaskError as exc:
                    raise JobError(str(exc)) from None
                self._inpaint[spec.id] = (pixels, regenerate)
            else:
                base = self.runner.encode_pixels(pixels)
        inputs = []
        for index, image in enumerate(spec.images):
            for y in image.labels:
                if not 0 <= int(y) < self.num_classes:
                    raise JobError(f"image {index}: label {y} is out of range (classes 0..{self.num_classes - 1})")
            weights = tuple(image.weights) if image.weights is not None else None
            if weights is not None and len(weights) != len(image.labels):
                raise JobError(f"image {index}: {len(weights)} weights given for {len(image.labels)} labels")
            try:
                cond = Condition(tuple(int(y) for y in image.labels), weights,
                                 spec.cfg_scale if image.labels else 1.0, spec.compose_mode)
            except ValueError as exc:
                raise JobError(str(exc)) from None
            rows = condition_rows(cond, self.null_label)
            if len(rows) > MAX_ROWS_PER_SAMPLE:
                raise JobError(f"image {index}: {len(rows)} model rows, at most {MAX_ROWS_PER_SAMPLE} per image "
                               f"(compose fewer labels)")
            inputs.append(SampleInput(SampleKey(spec.id, index), int(image.seed), rows, params, base,
                                      spec.noise_level if spec.kind == "denoise" else None, hold))
        return inputs

    @staticmethod
    def _mask(spec: JobSpec, pixels) -> "np.ndarray":
        """The (H, W) bool mask of an inpaint job (True = regenerate), unpacked from its spec."""
        import base64

        import numpy as np
        if not spec.mask:
            raise JobError("an inpaint job needs a mask and none was given")
        h, w = pixels.shape[:2]
        try:
            bits = np.unpackbits(np.frombuffer(base64.b64decode(spec.mask), dtype=np.uint8))
        except ValueError:
            raise JobError("the inpaint mask is not base64 of packed bits") from None
        if bits.size < h * w:
            raise JobError(f"the inpaint mask holds {bits.size} pixels, the image has {h * w}")
        return bits[:h * w].reshape(h, w).astype(bool)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job held here; its samples leave at the next step. False when it is not here."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancelled = True
        self.scheduler.cancel(job_id)
        return True

    # -- state ----------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self._jobs)

    def job_ids(self) -> list[str]:
        return list(self._jobs)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        t0 = time.perf_counter()
        out = self.scheduler.schedule(self.clock())
        needed = list(out.admit) + [s.key for s in out.stop if not s.started]
        run = self.runner.execute(out, {k: self._inputs[k] for k in needed})
        finished = self.scheduler.update(out, run.statuses)
        retired = self.runner.retire((f.key for f in finished), decode=self.encode_images)

        leaving = [_Departure(s.key, s.reason, run.stopped[s.key].steps, run.stopped[s.key].grad_norm,
                              run.stopped[s.key].latent) for s in out.stop]
        leaving += [_Departure(f.key, f.reason, f.steps, f.grad_norm, None) for f in finished]
        result = StepOutput(rows=run.rows_evaluated, bucket_rows=run.bucket_rows)
        # Emit what left ``emit_lag`` steps ago (or everything, once nothing runs): its copies were queued
        # before this step's work, so waiting for them does not wait for this step.
        self._unemitted.append((leaving, retired))
        keep = self.runner.emit_lag if out.run else 0
        while len(self._unemitted) > keep:
            self._emit(*self._unemitted.pop(0), result)
        finished_keys = {f.key for f in finished}
        result.progress = [Progress(k.job_id, k.index, st.steps, _finite(st.grad_norm))
                           for k, st in run.statuses.items() if k not in finished_keys]
        if self.preview_jobs:
            self._attach_previews(result.progress)

        result.seconds = time.perf_counter() - t0
        m = self.metrics
        if out.run:
            m.step_seconds.observe(result.seconds)
            m.nfe_total.inc(run.rows_evaluated)
        # Rows the forward evaluated / capacity rows; an engine left idle reads 0.
        m.batch_occupancy.set(run.rows_evaluated / self.runner.max_rows if self.has_work else 0.0)
        return result

    def _attach_previews(self, progress: list[Progress]) -> None:
        """Previews (small PNG data URLs) of the running images of previewed jobs that are due."""
        import base64
        now = time.monotonic()
        due = {j for j in self.preview_jobs
               if j in self._jobs and now - self._last_preview.get(j, -1e9) >= self.preview_interval_s}
        wanted = [p for p in progress if p.job_id in due]
        if not wanted:
            return
        pixels = self.runner.preview_pixels(SampleKey(p.job_id, p.index) for p in wanted)
        for p in wanted:
            image = pixels.get(SampleKey(p.job_id, p.index))
            if image is not None:
                p.preview = "data:image/png;base64," + base64.b64encode(encode_image(image, "png")).decode()
        for j in due:
            self._last_preview[j] = now

    def _emit(self, leaving: list[_Departure], retired: Retired, result: StepOutput) -> None:
        """Images and finished jobs out of the samples that left in one step (retired ones decoded
        by the runner, those stopped before the step here, in one batch)."""
        latents, retired_pixels = retired.result()
        energies = retired.energies()
        for d in leaving:
            if d.key in latents:
                d.latent = latents[d.key]
                d.energy = energies.get(d.key)
        kept = [d for d in leaving if d.latent is not None]      # cancelled samples leave no image
        pixels: dict[SampleKey, object] = {}
        if self.encode_images:
            pixels.update(retired_pixels or {})
            rest = [d for d in kept if d.key not in pixels]
            if rest:
                pixels.update(zip((d.key for d in rest), self.runner.decode(torch.stack([d.latent for d in rest]))))
        now = self.clock()
        for d in kept:
            job = self._jobs[d.key.job_id]
            res = ImageResult(index=d.key.index, steps=d.steps, grad_norm=_finite(d.grad_norm),
                              stopped_early=d.reason == "converged", deadline_exceeded=d.reason == "deadline",
                              content_type=content_type(job.spec.format),
                              energy=None if d.energy is None else _finite(d.energy))
            if d.key.job_id in self._inpaint and d.key in pixels:
                # The known pixels come back exactly (a latent model's decode only approximates them).
                original, regenerate = self._inpaint[d.key.job_id]
                pixels[d.key] = composite(pixels[d.key], original, regenerate)
            if not self.encode_images:
                data = None
            else:
                provenance = provenance_record(job.spec, d.key.index, res.steps, res.grad_norm, res.energy)
                if self.encode_pool is not None:
                    data = self.encode_pool.submit(encode_image, pixels[d.key], job.spec.format, provenance=provenance)
                else:
                    data = encode_image(pixels[d.key], job.spec.format, provenance=provenance)
            job.results[d.key.index] = res
            result.images.append(ImageOutput(d.key.job_id, res, data, d.latent))
        for d in leaving:
            key, reason, steps, grad_norm = d.key, d.reason, d.steps, d.grad_norm
            job = self._jobs[key.job_id]
            task = job.spec.kind
            self.metrics.images_total.labels(self.model_name, task, reason).inc()
            if reason != "cancelled":
                self.metrics.steps_per_sample.labels(self.model_name, task).observe(steps)
                if math.isfinite(grad_norm):
                    self.metrics.final_grad_norm.labels(self.model_name, task).observe(grad_norm)
            job.resolved += 1
            if job.resolved == len(job.spec.images):
                # A cancel that came after every image had finished (while the last were on their way
                # out) cancelled nothing.
                status = "cancelled" if job.cancelled and len(job.results) < len(job.spec.images) else "done"
                latency = max(0.0, now - job.submitted)
                result.jobs.append(JobOutput(key.job_id, status, [job.results[i] for i in sorted(job.results)], latency))
                self.metrics.jobs_total.labels(self.model_name, status).inc()
                self.metrics.job_latency_seconds.labels(self.model_name).observe(latency)
                del self._jobs[key.job_id]
                self._inpaint.pop(key.job_id, None)
                self._last_preview.pop(key.job_id, None)
            self._inputs.pop(key, None)

    def flush(self) -> StepOutput:
        """Emit, without stepping, the samples that left in earlier steps but are not emitted yet (a worker
        stopping before its engine is idle keeps what already finished)."""
        result = StepOutput()
        while self._unemitted:
            self._emit(*self._unemitted.pop(0), result)
        return result

    def run_until_idle(self, max_steps: int | None = None) -> list[StepOutput]:
        """Step until every job is resolved (tests, the benchmark, offline use)."""
        outputs, n = [], 0
        while self.has_work and (max_steps is None or n < max_steps):
            outputs.append(self.step())
            n += 1
        return outputs


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
