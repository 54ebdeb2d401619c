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
from fastapi.responses import JSONResponse

from service.api.conventions import caller, idempotency_key, public_base, request_fingerprint, wait_seconds
from service.api.deps import ApiState
from service.api.errors import field_error
from service.api.jobs import job_links, job_status_json
from service.api.modelinfo import ModelInfo
from service.api.schemas import JobCreated, SamplingOptions
from service.api.shutdown import unless_stopping
from service.classnames import LabelError
from service.jobstore import FINAL_STATUSES, JobSpec, QueueFull, SamplerSpec, worker_serves
from service.webhooks import WebhookTarget, register_webhook, unregister_webhook, webhook_target

RETRY_QUEUE_FULL_S = 5
RETRY_NO_WORKER_S = 10


def resolve_labels(labels: Sequence[int | str], model: ModelInfo, loc: Sequence[str | int]) -> list[int]:
    if labels and model.num_classes == 0:
        raise field_error(loc, f"model {model.name} is unconditional (it has no classes): leave the labels out")
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
    if opts.sampler == "heun-sde" and model.codec != "identity":
        raise field_error(("body", "sampler"), "heun-sde clamps its result to [-1, 1], the range of pixel-space "
                          f"models; model {model.name} works in {model.codec} latents: use nag or gd")
    pick = lambda value, default: default if value is None else value     # noqa: E731
    return SamplerSpec(sampler=pick(opts.sampler, d.sampler), step_size=pick(opts.step_size, d.step_size),
                       mu=pick(opts.mu, d.mu),
                       max_steps=pick(opts.max_steps, d.denoise_max_steps if denoise else d.max_steps),
                       grad_norm_threshold=pick(opts.grad_norm_threshold, d.grad_norm_threshold),
                       epsilon_max=pick(opts.epsilon_max, d.epsilon_max), time_cutoff=pick(opts.time_cutoff, d.time_cutoff))


def first_seed(opts: SamplingOptions) -> int:
    return opts.seed if opts.seed is not None else secrets.randbelow(2**31)


def deadline(opts: SamplingOptions, now: float) -> float | None:
    return None if opts.deadline_s is None else now + opts.deadline_s


def _admit(state: ApiState, model: str) -> None:
    """Raise 503/429 when the job could not run soon; runs in the thread pool (blocking Redis calls)."""
    workers = state.store.live_workers(state.settings.heartbeat_s)
    serving = [w for w in workers.values() if worker_serves(w, model)]
    if not serving:
        if state.redis_full():          # workers' heartbeats are refused too: say what is really wrong
            state.metrics.rejected_total.labels("redis_full").inc()
            raise HTTPException(507, "the job store (Redis) is out of memory (maxmemory reached); nothing was "
                                     "written; retry later", headers={"Retry-After": "5"})
        state.metrics.rejected_total.labels("no_worker").inc()
        other = sorted({str(m) for w in workers.values() for m in (w.get("models") or [w.get("model")])})
        why = f"; live workers serve {', '.join(other)}" if other else ""
        raise HTTPException(503, f"no live worker serves model {model!r}{why}; {state.no_worker_hint}",
                            headers={"Retry-After": str(RETRY_NO_WORKER_S)})


def _submit(state: ApiState, spec: JobSpec, input_png: bytes | None, owner: str | None) -> None:
    """Write and queue the job unless the queue is full (429): one script, so the limit holds exactly."""
    try:
        state.store.submit(spec, input_png, max_queue=state.settings.max_queue, owner=owner)
    except QueueFull as exc:
        state.metrics.rejected_total.labels("queue_full").inc()
        raise HTTPException(429, f"the queue is full ({exc.depth} jobs waiting, limit {exc.limit}); retry later",
                            headers={"Retry-After": str(RETRY_QUEUE_FULL_S)}) from None


async def enqueue(request: Request, state: ApiState, spec: JobSpec, input_png: bytes | None, *,
                  options: SamplingOptions | None = None, inputs: dict[str, bytes] | None = None) -> tuple[str, bool]:
    """Admit and store the job (its webhook, extra ``inputs`` keys, caller index); returns ``(job id, replayed)``.

    With ``Idempotency-Key`` a repeated request gives back the original job's id (``replayed``); the same
    key with a different request is a 422 (``service.api.conventions``)."""
    settings, store = state.settings, state.store
    who = caller(request, settings)
    try:
        idem = idempotency_key(request)
    except ValueError as exc:
        raise field_error(("header", "Idempotency-Key"), str(exc)) from None
    fingerprint = None
    if idem is not None:
        fingerprint = await request_fingerprint(request)
        earlier = await run_in_threadpool(store.idempotent_job, who, idem)
        replayed = await _replayed(state, who, idem, earlier, fingerprint)
        if replayed is not None:
            return replayed, True
    hook = _webhook(options, settings)
    await run_in_threadpool(_admit, state, spec.model)
    if idem is not None:
        earlier = await run_in_threadpool(store.claim_idempotency, who, idem, fingerprint, spec.id)
        replayed = await _replayed(state, who, idem, earlier, fingerprint)
        if replayed is not None:               # a concurrent twin took the key between our look and now
            return replayed, True
        if earlier is not None:                # the key's job had expired: take the key now
            await run_in_threadpool(store.claim_idempotency, who, idem, fingerprint, spec.id)
    try:
        await run_in_threadpool(_store_job, state, spec, input_png, inputs, who, hook, public_base(request, settings))
    except BaseException:
        if idem is not None:
            await run_in_threadpool(store.release_idempotency, who, idem)
        raise
    state.metrics.jobs_submitted_total.labels(spec.kind, spec.model).inc()
    state.metrics.images_requested_total.labels(spec.kind, spec.model).inc(len(spec.images))
    return spec.id, False


async def _replayed(state: ApiState, who: str, idem: str, earlier: dict | None, fingerprint: str) -> str | None:
    """The original job id of a repeated key; 422 when the request differs; None when there is none (any
    more: a key whose job expired is released)."""
    if earlier is None:
        return None
    if earlier.get("fingerprint") != fingerprint:
        raise field_error(("header", "Idempotency-Key"), "this Idempotency-Key was already used with a different "
                                                         "request; send a new key for a new request")
    if await state.aredis.exists(state.store.keys.job(earlier["job"])):
        return earlier["job"]
    await run_in_threadpool(state.store.release_idempotency, who, idem)
    return None


async def submit(request: Request, state: ApiState, spec: JobSpec, input_png: bytes | None, wait: bool, *,
                 options: SamplingOptions | None = None, inline: bool = False,
                 inputs: dict[str, bytes] | None = None):
    """Queue the job; answer 202 with its links, or when waiting (``?wait=true``, ``Prefer: wait=N``) the job
    once final (200) or as it is then (202). A replayed Idempotency-Key answers 200 with the original job."""
    wait_s, headers = wait_seconds(request, state.settings, wait)
    job_id, replayed = await enqueue(request, state, spec, input_png, options=options, inputs=inputs)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s > 0 or replayed:
        final = await wait_until_final(state, job_id, wait_s) if wait_s > 0 else False
        body = await run_in_threadpool(job_status_json, request, state, job_id, inline)
        headers["Location"] = body["links"]["self"]
        return JSONResponse(body, status_code=200 if final or replayed else 202, headers=headers)
    links = job_links(request, spec.id, len(spec.images))
    headers["Location"] = links.self
    body = JobCreated(id=spec.id, status="queued", kind=spec.kind, model=spec.model, num_images=len(spec.images),
                      links=links)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers=headers)


def _webhook(options: SamplingOptions | None, settings) -> WebhookTarget | None:
    if options is None or (options.webhook is None and not options.webhook_events_filter):
        return None
    if options.webhook is None:
        raise field_error(("body", "webhook_events_filter"), "webhook_events_filter needs a webhook URL")
    try:
        return webhook_target(options.webhook, options.webhook_events_filter, settings)
    except ValueError as exc:
        raise field_error(("body", "webhook"), str(exc)) from None


def _store_job(state: ApiState, spec: JobSpec, input_png: bytes | None, inputs: dict[str, bytes] | None, who: str,
               hook: WebhookTarget | None, base: str) -> None:
    """Blocking writes of one submission: extra inputs and the webhook first, so a worker never sees a job
    without them; then the job itself and its caller index."""
    store = state.store
    if inputs:
        pipe = state.redis.pipeline(transaction=True)
        for key, data in inputs.items():
            pipe.set(key, data, ex=store.ttl_s)
        pipe.execute()
    if hook is not None:
        register_webhook(state.redis, store.keys.prefix, spec.id, hook, base, store.ttl_s)
    try:
        _submit(state, spec, input_png, who if state.settings.api_keys or state.settings.admin_keys else None)
    except BaseException:
        if hook is not None:           # refused: nothing to follow (the dispatcher keeps a hook until it expires)
            unregister_webhook(state.redis, store.keys.prefix, spec.id)
        raise
    store.record_owner(who, spec.id, spec.submitted)


async def wait_until_final(state: ApiState, job_id: str, timeout_s: float) -> bool:
    """Follow the job's event stream until a final event (True), the timeout or the server's stop (False).

    A server that starts to stop answers its waiting requests at once (202 with the job's id and
    status) rather than cutting their connections."""
    return await unless_stopping(state.stopping, _follow_until_final(state, job_id, timeout_s), default=False)


async def _follow_until_final(state: ApiState, job_id: str, timeout_s: float) -> bool:
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
                if entry.name in FINAL_STATUSES:
                    return True
                continue
            if follower.released:              # the server stops (unless_stopping answers): no more reads
                return False
            status = await state.aredis.hget(keys.job(job_id), "status")
            if status is None or status.decode() in FINAL_STATUSES:    # expired, or its events were trimmed
                return status is not None
        return False
    finally:
        state.events.leave(follower)
