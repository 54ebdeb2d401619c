"""``GET /v1/jobs``: the caller's jobs, newest first; and the queue position / ETA of a queued job.

Listing: with API keys on, a caller sees only the jobs made with its key (an admin key: every job; and
``check_owner`` makes another key's job a 404 on every ``/v1/jobs/{id}`` route); with keys off, every job.
Pages are ``limit`` jobs long; ``next`` carries the cursor (the creation time of the last job shown)
for the following page, so pages stay stable while new jobs arrive. Expired jobs drop out.

Queue position: workers take jobs from the ``P:jobs`` stream in order, so the jobs ahead of a queued
job are the still-queued entries before its own. The ETA is (images ahead + its own) / throughput,
the throughput being measured on the most recent finished jobs (images / wall time they spanned).
"""
from __future__ import annotations

import json
import time
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from service.api.conventions import absolute, caller, reject_unknown_query
from service.api.deps import ApiState, get_state, may_see, require_api_key
from service.api.schemas import error_responses
from service.jobstore import EVERY_CALLER

router = APIRouter(prefix="/v1", tags=["jobs"], dependencies=[Depends(require_api_key), Depends(reject_unknown_query)])

MAX_PAGE = 100
QUEUE_SCAN = 5000              # stream entries looked at for a queue position
THROUGHPUT_JOBS = 50           # recent finished jobs the throughput is measured on
THROUGHPUT_CACHE_S = 2.0


class JobSummary(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    kind: str
    model: str
    created: float | None = Field(None, description="unix seconds")
    finished: float | None = None
    num_images: int
    url: str = Field(description="the job's status")


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next: str | None = Field(None, description="URL of the next page (older jobs); null on the last page")


@router.get("/jobs", response_model=JobPage, summary="List your jobs, newest first",
            responses=error_responses(401, 422))
def list_jobs(request: Request, limit: int = Query(20, ge=1, le=MAX_PAGE, description="jobs per page"),
              status: Literal["queued", "running", "done", "failed", "cancelled"] | None = Query(
                  None, description="only jobs in this status"),
              before: float | None = Query(None, ge=0, le=1e11, description="cursor: jobs created before this "
                                           "time (unix seconds; from `next`)"),
              state: ApiState = Depends(get_state)) -> JobPage:
    """The caller's jobs (all jobs when the server has no API keys, or for an admin key) still within the
    result TTL."""
    store, who = state.store, caller(request, state.settings)
    if getattr(request.state, "api_admin", False):       # an admin key sees every job, so it lists them too
        who = EVERY_CALLER
    out: list[JobSummary] = []
    cursor, exhausted = before, False
    while len(out) < limit and not exhausted:
        batch = store.owned_jobs(who, cursor, max(limit, 20))
        exhausted = len(batch) < max(limit, 20)
        if not batch:
            break
        pipe = state.redis.pipeline(transaction=False)
        for job_id, _ in batch:
            pipe.hmget(store.keys.job(job_id), "status", "spec", "finished")
        expired = []
        for (job_id, created), (st, spec, finished) in zip(batch, pipe.execute()):
            cursor = created
            if st is None:
                expired.append(job_id)
                continue
            if status is not None and st.decode() != status:
                continue
            spec_d = json.loads(spec)
            path = request.url_for("get_job", job_id=job_id).path
            out.append(JobSummary(id=job_id, status=st.decode(), kind=spec_d["kind"], model=spec_d["model"],
                                  created=created, finished=float(finished) if finished else None,
                                  num_images=len(spec_d["images"]), url=absolute(request, state.settings, path)))
            if len(out) == limit:
                break
        store.forget_owned(who, expired)
    more = len(out) == limit and bool(store.owned_jobs(who, cursor, 1))
    next_url = None
    if more:
        query = f"limit={limit}&before={cursor!r}" + (f"&status={status}" if status else "")
        next_url = absolute(request, state.settings, request.url.path) + "?" + query
    return JobPage(jobs=out, next=next_url)


# -- ownership ------------------------------------------------------------------------------------

def not_found(job_id: str) -> HTTPException:
    return HTTPException(404, f"job {job_id} not found (unknown, or expired after its TTL)")


def check_owner(request: Request, state: ApiState, job_id: str) -> None:
    """404 for an unknown job, or, with API keys on, for a job made with another key (as if unknown:
    ids are not confirmed to others); an admin key sees every job (``deps.may_see``). Free when keys are off."""
    settings = state.settings
    if not settings.api_keys and not settings.admin_keys:
        return
    exists, owner = state.store.owner(job_id)
    if not exists or not may_see(request, owner):
        raise not_found(job_id)


async def check_owner_async(request: Request, state: ApiState, job_id: str) -> None:
    """``check_owner`` for async routes (one HMGET on the shared async client)."""
    settings = state.settings
    if not settings.api_keys and not settings.admin_keys:
        return
    spec, owner = await state.aredis.hmget(state.store.keys.job(job_id), "spec", "owner")
    if spec is None or not may_see(request, owner.decode() if owner else None):
        raise not_found(job_id)


def require_owner(request: Request, job_id: str) -> None:
    """``check_owner`` as a route dependency."""
    check_owner(request, request.app.state.api, job_id)


# -- queue position and ETA ----------------------------------------------------------------------

def queue_estimate(state: ApiState, job_id: str, num_images: int, model: str) -> tuple[int | None, float | None]:
    """(jobs ahead in its model's queue, estimated seconds to finish) of a queued job; (None, None) when it is
    not in the stream."""
    keys = state.store.keys
    entries = state.redis.xrange(keys.stream_for(model), "-", "+", count=QUEUE_SCAN)
    ahead: list[str] = []
    found = False
    for _, fields in entries:
        other = fields.get(b"id", b"").decode()
        if other == job_id:
            found = True
            break
        ahead.append(other)
    if not found:
        return None, None
    pipe = state.redis.pipeline(transaction=False)
    for other in ahead:
        pipe.hmget(keys.job(other), "status", "spec")
    position, images = 0, num_images
    for st, spec in pipe.execute():
        if st is not None and st.decode() == "queued" and spec is not None:
            position += 1
            images += len(json.loads(spec)["images"])
    rate = _throughput(state)
    return position, (round(images / rate, 2) if rate else None)


def _throughput(state: ApiState) -> float | None:
    """Images per second over the most recent finished jobs (cached a moment per API process)."""
    cache = getattr(state, "_throughput_cache", None)
    now = time.monotonic()
    if cache and now - cache[0] < THROUGHPUT_CACHE_S:
        return cache[1]
    store = state.store
    recent = [j.decode() for j in state.redis.zrevrange(store.recent_key, 0, 4 * THROUGHPUT_JOBS)]
    pipe = state.redis.pipeline(transaction=False)
    for job_id in recent:
        pipe.hmget(store.keys.job(job_id), "status", "started", "finished", "spec")
    spans, images = [], 0
    for st, started, finished, spec in pipe.execute():
        if st is None or st.decode() != "done" or not started or not finished:
            continue
        spans.append((float(started), float(finished)))
        images += len(json.loads(spec)["images"])
        if len(spans) == THROUGHPUT_JOBS:
            break
    rate = None
    if spans:
        wall = max(f for _, f in spans) - min(s for s, _ in spans)
        rate = images / wall if wall > 0 else None
    if rate is not None:           # no history yet: look again next time
        state._throughput_cache = (now, rate)
    return rate

