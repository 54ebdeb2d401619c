"""From a validated request to a queued job: labels, defaults, admission control, submission, waiting.

Admission is checked after the request is known to be valid, so a refused request changes nothing:
503 when Redis is down or no live worker serves the model, 429 when the queue holds ``max_queue``
jobs (exact under concurrent submissions: the submit script checks the limit and writes the job in
one step), 507 when Redis is out of memory. All carry ``Retry-After``.
"""
from __future__ import annotations

import asyncio
import secrets
from typing import Sequence

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.api.deps import ApiState
from service.api.jobs import job_links, read_job_status
from service.api.modelinfo import ModelInfo
from service.api.schemas import JobCreated, SamplingOptions
from service.classnames import LabelError
from service.jobs import FINAL_STATUSES, JobSpec, QueueFull, SamplerSpec

RETRY_QUEUE_FULL_S = 5
RETRY_NO_WORKER_S = 10


def field_error(loc: Sequence[str | int], msg: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own validation errors."""
    return RequestValidationError([{"loc": tuple(loc), "msg": msg, "type": "value_error"}])


def check_model(requested: str | None, model: ModelInfo, loc: Sequence[str | int]) -> None:
    if requested is not None and requested != model.name:
        raise field_error(loc, f"unknown model {requested!r}: this server serves {model.name!r} (see GET /v1/models)")


def resolve_labels(labels: Sequence[int | str], model: ModelInfo, loc: Sequence[str | int]) -> list[int]:
    out = []
    for i, label in enumerate(labels):
        try:
            out.append(model.classes.resolve(label))
        except LabelError as exc:
            raise field_error((*loc, i), str(exc)) from None
    return out


def check_image_count(count: int, state: ApiState, loc: Sequence[str | int], what: str) -> None:
    limit = state.settings.max_images_per_job
    if count > limit:
        raise field_error(loc, f"{what} asks for {count} images, more than {limit} per job; split it into several jobs")


def sampler_spec(opts: SamplingOptions, model: ModelInfo, denoise: bool = False) -> SamplerSpec:
    d = model.defaults
    pick = lambda value, default: default if value is None else value     # noqa: E731
    return SamplerSpec(sampler=pick(opts.sampler, d.sampler), step_size=pick(opts.step_size, d.step_size),
                       mu=pick(opts.mu, d.mu),
                       max_steps=pick(opts.max_steps, d.denoise_max_steps if denoise else d.max_steps),
                       grad_norm_threshold=pick(opts.grad_norm_threshold, d.grad_norm_threshold))


def first_seed(opts: SamplingOptions) -> int:
    return opts.seed if opts.seed is not None else secrets.randbelow(2**31)


def deadline(opts: SamplingOptions, now: float) -> float | None:
    return None if opts.deadline_s is None else now + opts.deadline_s


def _admit(state: ApiState) -> None:
    """Raise 503/429 when the job could not run soon; runs in the thread pool (blocking Redis calls)."""
    workers = state.store.live_workers(state.settings.heartbeat_s)
    serving = [w for w in workers.values() if w.get("model") == state.model.name]
    if not serving:
        if state.redis_full():          # workers' heartbeats are refused too: say what is really wrong
            state.metrics.rejected_total.labels("redis_full").inc()
            raise HTTPException(507, "the job store (Redis) is out of memory (maxmemory reached); nothing was "
                                     "written; retry later", headers={"Retry-After": "5"})
        state.metrics.rejected_total.labels("no_worker").inc()
        other = sorted({str(w.get("model")) for w in workers.values()})
        why = f"; live workers serve {', '.join(other)}" if other else ""
        raise HTTPException(503, f"no live worker serves model {state.model.name!r}{why}; start one with "
                                 f"`eqm worker` (or use `eqm serve`)", headers={"Retry-After": str(RETRY_NO_WORKER_S)})


def _submit(state: ApiState, spec: JobSpec, input_png: bytes | None, owner: str | None) -> None:
    """Write and queue the job unless the queue is full (429): one script, so the limit holds exactly."""
    try:
        state.store.submit(spec, input_png, max_queue=state.settings.max_queue, owner=owner)
    except QueueFull as exc:
        state.metrics.rejected_total.labels("queue_full").inc()
        raise HTTPException(429, f"the queue is full ({exc.depth} jobs waiting, limit {exc.limit}); retry later",
                            headers={"Retry-After": str(RETRY_QUEUE_FULL_S)}) from None


async def submit(request: Request, state: ApiState, spec: JobSpec, input_png: bytes | None, wait: bool):
    """Queue the job; answer 202 with its links, or with ``wait`` the job once final (200) or as it is then (202)."""
    await run_in_threadpool(_admit, state)
    await run_in_threadpool(_submit, state, spec, input_png, getattr(request.state, "api_key_id", None))
    state.metrics.jobs_submitted_total.labels(spec.kind).inc()
    state.metrics.images_requested_total.labels(spec.kind).inc(len(spec.images))
    links = job_links(request, spec.id, len(spec.images))
    headers = {"Location": links.self}
    if wait:
        final = await wait_until_final(state, spec.id, state.settings.wait_timeout_s)
        status = await run_in_threadpool(read_job_status, request, state, spec.id)
        return JSONResponse(status.model_dump(mode="json"), status_code=200 if final else 202, headers=headers)
    body = JobCreated(id=spec.id, status="queued", kind=spec.kind, model=spec.model, num_images=len(spec.images),
                      links=links)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers=headers)


async def wait_until_final(state: ApiState, job_id: str, timeout_s: float) -> bool:
    """Follow the job's events (through the process' shared reader) until a final event (True) or the
    timeout (False). While quiet, the record is looked at every 5 s (expired, or final events trimmed)."""
    keys = state.store.keys
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    last = "0"
    reply = await state.aredis.xread({keys.events(job_id): last}, count=1000)    # what happened so far
    for _, entries in reply or []:
        for entry_id, fields in entries:
            last = entry_id.decode()
            if fields.get(b"event", b"").decode() in FINAL_STATUSES:
                return True
    follower = state.events.follow(keys.events(job_id), last)
    try:
        while (left := end - loop.time()) > 0:
            entry = await follower.next(min(left, 5.0))
            if entry is not None:
                if entry[1].get(b"event", b"").decode() in FINAL_STATUSES:
                    return True
                continue
            status = await state.aredis.hget(keys.job(job_id), "status")
            if status is None or status.decode() in FINAL_STATUSES:    # expired, or its events were trimmed
                return status is not None
        return False
    finally:
        state.events.leave(follower)
