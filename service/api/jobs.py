"""``/v1/jobs/{id}``: status, images, server-sent events and cancellation of one job."""
from __future__ import annotations

import base64
import json
import re
import time
from typing import AsyncIterator

import redis
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.conventions import public_base, reject_unknown_query
from service.api.deps import ApiState, get_state, require_api_key
from service.api.listing import check_owner, check_owner_async, not_found, queue_estimate
from service.api.replays import REPLAY_PAGE, chunks
from service.api.schemas import (CancelResult, ImageStatus, JobLinks, JobStatus, SamplerSettings, Timings,
                                 error_responses)
from service.api.uploads import LimitedBodyRoute
from service.jobstore import FINAL_STATUSES, IMAGE_FORMATS

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=LimitedBodyRoute,
                   dependencies=[Depends(require_api_key), Depends(reject_unknown_query)])
# Ownership: every route below checks it once itself (check_owner / check_owner_async).

JobId = Path(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="the id returned at submission",
             examples=["4f0c1e9a0b6d4c1e8d2f7a5b3c9e1d20"])
KEEPALIVE_S = 15.0
_ENTRY_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")       # a Redis stream id: two unsigned 64-bit integers


# -- status -----------------------------------------------------------------------------------

def read_job_status(request: Request, state: ApiState, job_id: str) -> JobStatus:
    """The job record, its images' progress and whether each image is stored (blocking Redis calls)."""
    check_owner(request, state, job_id)
    rec = state.store.get(job_id)
    if rec is None:
        raise not_found(job_id)
    spec = rec["spec"]
    n = len(spec["images"])
    stored = rec["ready"]
    results = {r["index"]: r for r in rec["images"]}
    progress = rec["progress"]
    content_type = IMAGE_FORMATS.get(spec.get("format", "png"), "image/png")
    links = job_links(request, job_id, n)
    images = []
    for k, image in enumerate(spec["images"]):
        result = results.get(k)
        seen = progress[k] if k < len(progress) else {}
        images.append(ImageStatus(
            index=k, labels=image.get("labels", []), weights=image.get("weights"), seed=image["seed"],
            ready=stored[k], steps=(result or seen).get("steps") or 0, grad_norm=(result or seen).get("grad_norm"),
            stopped_early=result.get("stopped_early") if result else None,
            deadline_exceeded=result.get("deadline_exceeded") if result else None,
            energy=result.get("energy") if result else None,
            content_type=content_type, url=links.images[k]))
    queue_position = eta_s = None
    if rec["status"] == "queued":
        queue_position, eta_s = queue_estimate(state, job_id, n, rec["spec"]["model"])
    created, started, finished = rec["created"], rec["started"], rec["finished"]
    end = finished or time.time()
    timings = Timings(queued_s=_span(created, started or end),
                      running_s=_span(started, end) if started else None, total_s=_span(created, end))
    return JobStatus(id=job_id, status=rec["status"], kind=spec["kind"], model=spec["model"], created=created,
                     started=started, finished=finished, timings=timings, guidance_scale=_guidance_scale(spec),
                     sampler=SamplerSettings(**spec["sampler"]), format=spec["format"],
                     noise_level=spec.get("noise_level"), deadline=spec.get("deadline"), worker=rec["worker"],
                     attempts=rec["attempts"], error=rec["error"], cancel_requested=rec["cancel_requested"],
                     queue_position=queue_position, eta_s=eta_s, images=images, links=links)


def job_status_json(request: Request, state: ApiState, job_id: str, inline: bool = False) -> dict:
    """The job's status as JSON; with ``inline`` every ready image's bytes as base64 (blocking Redis calls)."""
    status = read_job_status(request, state, job_id)
    body = status.model_dump(mode="json")
    if inline:
        ready = [img for img in body["images"] if img["ready"]]
        pipe = state.redis.pipeline(transaction=False)
        for img in ready:
            pipe.get(state.store.keys.image(job_id, img["index"]))
        for img, data in zip(ready, pipe.execute()):
            img["b64_json"] = base64.b64encode(data).decode() if data is not None else None
    return body


def job_links(request: Request, job_id: str, num_images: int) -> JobLinks:
    """Absolute URLs of a job's status, events and images (``conventions.public_base``)."""
    base = public_base(request, request.app.state.api.settings)
    return JobLinks(self=base + request.url_for("get_job", job_id=job_id).path,
                    events=base + request.url_for("job_events", job_id=job_id).path,
                    images=[base + request.url_for("get_image", job_id=job_id, index=k).path for k in range(num_images)])


def _span(start: float | None, end: float | None) -> float | None:
    return round(max(0.0, end - start), 4) if start is not None and end is not None else None


@router.get("/{job_id}", response_model=JobStatus, summary="Job status, per-image steps and gradient norms",
            responses=error_responses(401, 404, 422))
def get_job(request: Request, job_id: str = JobId, state: ApiState = Depends(get_state),
            inline: bool = Query(False, description="each ready image's bytes as base64 in b64_json")):
    """Status (queued, running, done, failed, cancelled), timings, and for every image its seed, the
    gradient updates taken, the last gradient norm and whether it can be downloaded yet. While queued:
    the jobs ahead of it and an estimate of when it will be done."""
    if inline:
        return JSONResponse(job_status_json(request, state, job_id, inline=True))
    return read_job_status(request, state, job_id)


# -- images -----------------------------------------------------------------------------------

# The job's own format, or raw bytes for a client that asks only for application/octet-stream (client
# generators type that one as bytes; they know no image/* type).
OCTET_STREAM = "application/octet-stream"
_IMAGE_CONTENT = {ct: {"schema": {"type": "string", "format": "binary"}}
                  for ct in (*IMAGE_FORMATS.values(), OCTET_STREAM)}


@router.get("/{job_id}/images/{index}", response_class=Response, summary="Download image k of a job",
            responses={200: {"content": _IMAGE_CONTENT, "description": "the encoded image"},
                       **error_responses(401, 404, 409, 422)})
def get_image(request: Request, job_id: str = JobId,
              index: int = Path(..., ge=0, le=100_000, description="image index k"),
              state: ApiState = Depends(get_state)) -> Response:
    """The image bytes, in the job's format (PNG, JPEG or WebP; as ``application/octet-stream`` when the
    Accept header asks for that and no image type). Images become available one by one as they finish,
    before the job as a whole is done."""
    check_owner(request, state, job_id)
    keys = state.store.keys
    pipe = state.redis.pipeline(transaction=False)
    pipe.get(keys.image(job_id, index))
    pipe.hmget(keys.job(job_id), "spec", "status")
    data, (spec_json, status) = pipe.execute()
    if spec_json is None:
        raise not_found(job_id)
    spec = json.loads(spec_json)
    n = len(spec["images"])
    if index >= n:
        raise HTTPException(404, f"job {job_id} has {n} image(s): indices 0..{n - 1}")
    if data is not None:
        accept = request.headers.get("accept", "")
        raw = OCTET_STREAM in accept and "image/" not in accept
        media_type = OCTET_STREAM if raw else IMAGE_FORMATS.get(spec["format"], OCTET_STREAM)
        return Response(content=data, media_type=media_type,
                        headers={"Cache-Control": "private, max-age=3600", "Vary": "Accept"})
    status = status.decode() if status else "unknown"
    if status in FINAL_STATUSES:
        raise HTTPException(404, f"image {index} of job {job_id} was not produced: the job is {status}")
    raise HTTPException(409, f"image {index} of job {job_id} is not finished yet (job {status}); "
                             f"follow the job's events or retry", headers={"Retry-After": "1"})


def _guidance_scale(spec: dict) -> float | None:
    """The scale the job runs with; none for a composition in "sum" mode, which has no unconditional row."""
    return None if spec.get("compose_mode") == "sum" else spec["cfg_scale"]


# -- events -----------------------------------------------------------------------------------

def _stream_id(text: str) -> bool:
    """True for an id Redis accepts as a stream position (ASCII digits, each part below 2^64)."""
    return bool(_ENTRY_ID.match(text)) and all(int(part) < 2**64 for part in text.split("-"))


@router.get("/{job_id}/events", response_class=StreamingResponse, summary="Server-sent events of a job",
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "events queued, started, progress, image, then done | failed | "
                                            "cancelled (or stopping, when the server stops), after which the "
                                            "stream ends"},
                       **error_responses(401, 404, 422)})
async def job_events(request: Request, job_id: str = JobId,
                     last_event_id: str | None = Header(None, description="resume after this "
                     "event id (browsers send it when they reconnect)"), state: ApiState = Depends(get_state),
                     previews: bool = Query(False, description="live previews: each progress entry of a running "
                                            "image carries `preview`, its current iterate as a small PNG "
                                            "(data:image/png;base64 URL), at most every 0.3 s; nothing is decoded "
                                            "for jobs no client previews")):
    """Replays the job's events from the start (or after ``Last-Event-ID``), then follows them live.
    ``progress`` carries ``images: [{index, steps, grad_norm, norms}]`` (``norms``: the gradient norms
    of the evaluations since the previous progress event); ``image`` carries one image's final steps
    and norm, and its remaining ``norms``. The stream ends after the final event; comments keep idle connections open.
    With ``?previews=true`` progress entries also carry ``preview`` (see the parameter)."""
    await check_owner_async(request, state, job_id)
    if not await state.aredis.exists(state.store.keys.job(job_id)):
        raise not_found(job_id)
    start = last_event_id if last_event_id and _stream_id(last_event_id) else "0"     # else: replay from the start
    return StreamingResponse(_event_stream(state, job_id, start, previews), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(event: str, data: str) -> bytes:
    """An event the API says itself (no stream entry, so no id)."""
    return f"event: {event}\ndata: {data}\n\n".encode()


async def _event_stream(state: ApiState, job_id: str, last: str, previews: bool = False) -> AsyncIterator[bytes]:
    """Replay with plain XREADs (each page read once for the streams opening at about the same time),
    then follow through the process' shared reader (no connection held per stream), which frames each
    entry once for all its followers; whatever is pending goes out at once, in writes of at most
    ``replays.CHUNK_BYTES``. While quiet, a comment every ``KEEPALIVE_S`` and a look at the record (expired, or
    final with its final event trimmed)."""
    keys = state.store.keys
    key = keys.events(job_id)
    follower = None
    asked = _PreviewAsk(state, job_id) if previews else None
    try:
        if asked is not None:
            await asked.refresh()
        while True:         # replay: everything after `last`, in pages shared with streams opening meanwhile
            events = await state.replays.page(state.aredis, key, last)
            if events:
                last = events[-1].id
                pieces, final = chunks(events, previews)
                for piece in pieces:
                    yield piece
                if final:
                    return
            if len(events) < REPLAY_PAGE:
                break
        follower = state.events.follow(key, last)
        while True:
            events = [] if state.stopping.is_set() else await follower.drain(KEEPALIVE_S)
            if state.stopping.is_set():         # the server stops: a last event, so clients know to come back
                yield _sse("stopping", json.dumps({"id": job_id, "detail": "the server is stopping; reconnect "
                                                   "later with Last-Event-ID to follow the job on"}))
                return
            if asked is not None:
                await asked.refresh()
            if events:
                pieces, final = chunks(events, previews)
                for piece in pieces:
                    yield piece
                if final:
                    return
                continue
            try:
                status, error = await state.aredis.hmget(keys.job(job_id), "status", "error")
            except redis.ConnectionError:       # Redis restarting: the shared reader resumes after `last`
                yield b": keep-alive (job store unreachable, retrying)\n\n"
                continue
            if status is None:
                yield _sse("expired", json.dumps({"id": job_id, "detail": "the job expired after its TTL"}))
                return
            if status.decode() in FINAL_STATUSES and not follower.pending:
                # Final, but its final event was trimmed from the stream: say it from the record.
                data = {"id": job_id, "status": status.decode(), "error": error.decode() if error else None}
                yield _sse(status.decode(), json.dumps(data))
                return
            yield b": keep-alive\n\n"
    except redis.RedisError as exc:
        yield _sse("error", json.dumps({"id": job_id, "detail": f"lost the job store: {exc}; reconnect"}))
    finally:
        if follower is not None:
            state.events.leave(follower)


PREVIEW_ASK_TTL_S = 20       # the worker previews a job while some follower refreshed this recently


class _PreviewAsk:
    """Tells the workers a client follows a job with previews: a key with a TTL, refreshed every few seconds."""

    def __init__(self, state: ApiState, job_id: str):
        self.state, self.key, self.at = state, state.store.keys.previews(job_id), 0.0

    async def refresh(self) -> None:
        now = time.monotonic()
        if now - self.at >= PREVIEW_ASK_TTL_S / 4:
            self.at = now
            await self.state.aredis.set(self.key, 1, ex=PREVIEW_ASK_TTL_S)


# -- cancel -----------------------------------------------------------------------------------

@router.delete("/{job_id}", response_model=CancelResult, summary="Cancel a job",
               responses={202: {"model": CancelResult, "description": "cancellation asked; the running job stops "
                                "at its next step"}, **error_responses(401, 404, 422)})
def cancel_job(request: Request, job_id: str = JobId, state: ApiState = Depends(get_state)):
    """A queued job is cancelled at once (200). A running job's images leave the batch at the worker's
    next step (202); images already finished stay downloadable. A final job is left as it is (200)."""
    check_owner(request, state, job_id)
    before = state.store.r.hget(state.store.keys.job(job_id), "status")
    status = state.store.cancel(job_id)
    if status is None:
        raise not_found(job_id)
    if status == "cancelled":
        already = before is not None and before.decode() == "cancelled"
        body = CancelResult(id=job_id, status=status, cancel_requested=not already,
                            message="already cancelled" if already else "cancelled before it started")
        return JSONResponse(body.model_dump(), status_code=200)
    if status in FINAL_STATUSES:
        body = CancelResult(id=job_id, status=status, cancel_requested=False,
                            message=f"the job is already {status}; nothing to cancel")
        return JSONResponse(body.model_dump(), status_code=200)
    body = CancelResult(id=job_id, status=status, cancel_requested=True,
                        message="cancellation asked; the worker stops the job at its next step")
    return JSONResponse(body.model_dump(), status_code=202)
