"""``/v1/sampling-runs``: many samples (an FID's 50,000) as one run, downloaded as the ADM evaluator's ``.npz``.

A run is split into shards that go through the model's queue as ordinary low-priority jobs; their images
go to the results store (``EQM_RESULTS_DIR``), and the keeper (``service.runs.keeper``) assembles them.
"""
from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service.api.conventions import public_base
from service.api.deps import ApiState, get_state, may_see, require_api_key
from service.api.schemas import error_responses
from service.api.submit import _admit, field_error, resolve_labels, sampler_spec
from service.runs import store as results
from service.runs.keeper import RunKeeper, RunMetrics, progress
from service.runs.plan import DEFAULT_PRIORITY, PlanError, new_run, run_labels

router = APIRouter(prefix="/v1/sampling-runs", tags=["sampling runs"], dependencies=[Depends(require_api_key)])

_FULL = {507: {"description": "the run needs more space than the results store has free (nothing was written)"}}
_RANGE = {206: {"description": "the byte range asked for (Range)"}, 416: {"description": "a range past the file's end"}}
RunId = Path(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9]+$", description="the id returned at submission")
FINAL = ("done", "failed", "cancelled")


class SamplingRunRequest(BaseModel):
    """A run: ``num_samples`` images, image ``i`` with seed ``seed + i`` and label ``labels[i]``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str | None = Field(None, max_length=200, description="model to use; default: the served model")
    num_samples: int = Field(..., ge=1, description="images in the run (limit: EQM_MAX_RUN_SAMPLES)", examples=[50000])
    labels: Literal["uniform"] | list[int | str] = Field(
        "uniform", description="\"uniform\" (the ADM convention: num_samples / num_classes per class, classes in "
        "order) or one label (index or class name) per image")
    seed: int = Field(0, ge=0, le=2**62, description="seed of image 0; image i uses seed + i")
    guidance_scale: float | None = Field(None, ge=0, le=20, description="classifier-free guidance scale")
    sampler: Literal["nag", "gd", "heun-sde"] | None = None
    step_size: float | None = Field(None, gt=0, le=1)
    mu: float | None = Field(None, ge=0, lt=1)
    max_steps: int | None = Field(None, ge=1, le=1000)
    grad_norm_threshold: float | None = Field(None, ge=0, le=10_000)
    epsilon_max: float | None = Field(None, ge=0, le=10)
    time_cutoff: float | None = Field(None, ge=0, le=1)
    shard_size: int | None = Field(None, ge=1, description="images per shard job (default and limit: the "
                                   "server's images per job, EQM_MAX_IMAGES_PER_JOB)")
    priority: int = Field(DEFAULT_PRIORITY, ge=-9, le=9, description="queue priority of the shards (interactive "
                          "requests have 0..9; the default -1 keeps them ahead of the run)")


def start_runs(app: FastAPI, state: ApiState) -> RunKeeper:
    """The lifespan's hook: this process' run keeper (one thread), reachable from the handlers."""
    root = results.root_of(state.settings.results_dir)
    keeper = RunKeeper(root, state.store, RunMetrics(state.metrics.registry),
                       heartbeat_s=state.settings.heartbeat_s).start()
    app.state.runs = keeper
    return keeper


def _keeper(request: Request) -> RunKeeper:
    return request.app.state.runs


@router.post("", status_code=202, summary="Start a sampling run", responses={**error_responses(401, 503), **_FULL})
async def create_run(request: Request, body: SamplingRunRequest, state: ApiState = Depends(get_state)) -> JSONResponse:
    model, settings = state.pick_model(body.model), state.settings
    if body.num_samples > settings.max_run_samples:
        raise field_error(("body", "num_samples"), f"num_samples={body.num_samples} is more than this server's limit "
                          f"of {settings.max_run_samples} per run (EQM_MAX_RUN_SAMPLES); split it into several runs")
    shard_size = body.shard_size or settings.max_images_per_job
    if shard_size > settings.max_images_per_job:
        raise field_error(("body", "shard_size"), f"shard_size={shard_size} is more than {settings.max_images_per_job} "
                          "images per job (EQM_MAX_IMAGES_PER_JOB)")
    keeper = _keeper(request)
    try:
        await run_in_threadpool(results.check_writable, keeper.root)
    except results.StoreError as exc:
        raise HTTPException(503, str(exc)) from None
    need = results.estimate_bytes(body.num_samples, model.image_size, model.image_size, model.channels)
    free = await run_in_threadpool(results.free_bytes, keeper.root)
    if need > free:
        raise HTTPException(507, f"the run needs about {need / 1e9:.2f} GB in the results store and "
                                 f"{keeper.root} has {free / 1e9:.2f} GB free; free space or ask for fewer samples")
    labels = body.labels if body.labels == "uniform" else resolve_labels(body.labels, model, ("body", "labels"))
    try:
        labels = run_labels(labels, body.num_samples, model.num_classes)
    except PlanError as exc:
        raise field_error(("body", "labels"), str(exc)) from None
    sampler = sampler_spec(body, model)
    cfg_scale = model.defaults.guidance_scale if body.guidance_scale is None else body.guidance_scale
    await run_in_threadpool(_admit, state, model.name)
    record = new_run(model=model.name, labels=labels, seed=body.seed, cfg_scale=cfg_scale, sampler=sampler,
                     shard_size=shard_size, priority=body.priority, image_size=(model.image_size, model.image_size),
                     channels=model.channels)
    record["owner"] = getattr(request.state, "api_key_id", None)
    await run_in_threadpool(keeper.submit, record)
    body_out = run_json(request, record)
    return JSONResponse(body_out, status_code=202, headers={"Location": body_out["links"]["self"]})


@router.get("/{run_id}", summary="A run's status and progress (done/total, images/s, ETA, NFE, failed shards)",
            responses=error_responses(401, 404))
async def get_run(request: Request, run_id: str = RunId) -> dict:
    return run_json(request, await _record(request, run_id))


@router.post("/{run_id}/cancel", summary="Cancel a run: no more shards are scheduled; finished shards stay",
             responses=error_responses(401, 404))
async def cancel_run(request: Request, run_id: str = RunId) -> dict:
    await _record(request, run_id)
    return run_json(request, await run_in_threadpool(_keeper(request).cancel, run_id))


@router.post("/{run_id}/resume", summary="Resume a cancelled or failed run from the shards not yet done",
             responses=error_responses(401, 404))
async def resume_run(request: Request, run_id: str = RunId) -> dict:
    await _record(request, run_id)
    return run_json(request, await run_in_threadpool(_keeper(request).resume, run_id))


@router.get("/{run_id}/npz", response_class=FileResponse, summary="Download the ADM .npz (arr_0 images, arr_1 labels)",
            responses={200: {"content": {"application/octet-stream": {}}}, **_RANGE, **error_responses(401, 404, 409)})
async def download_npz(request: Request, run_id: str = RunId) -> FileResponse:
    return await _download(request, run_id, results.SAMPLES_FILE)


@router.get("/{run_id}/stats", response_class=FileResponse,
            summary="Download per-image steps, final gradient norms, energies, seeds and labels (.npz)",
            responses={200: {"content": {"application/octet-stream": {}}}, **_RANGE, **error_responses(401, 404, 409)})
async def download_stats(request: Request, run_id: str = RunId) -> FileResponse:
    return await _download(request, run_id, results.STATS_FILE)


@router.get("/{run_id}/events", response_class=StreamingResponse, summary="Server-sent events of a run's progress",
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
                       **error_responses(401, 404)})
async def run_events(request: Request, run_id: str = RunId) -> StreamingResponse:
    await _record(request, run_id)
    return StreamingResponse(_events(request, run_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(request: Request, run_id: str):
    """``progress`` whenever the counts change, then the final status as its own event; a comment as keep-alive."""
    root, last, quiet = _keeper(request).root, None, 0
    while not await request.is_disconnected():
        record = await run_in_threadpool(results.load_run, root, run_id)
        if record is None:
            return
        body = run_json(request, record)
        now = json.dumps(body["progress"])
        if now != last:
            last, quiet = now, 0
            yield f"event: progress\ndata: {json.dumps({'id': run_id, **body['progress']})}\n\n"
        if record["status"] in FINAL:
            yield f"event: {record['status']}\ndata: {json.dumps(body)}\n\n"
            return
        quiet += 1
        if quiet % 15 == 0:
            yield ": keep-alive\n\n"
        await asyncio.sleep(1.0)


async def _record(request: Request, run_id: str) -> dict:
    record = await run_in_threadpool(results.load_run, _keeper(request).root, run_id)
    if record is None or not may_see(request, record.get("owner")):
        raise HTTPException(404, f"no sampling run {run_id!r} (or it is not yours)")
    return record


async def _download(request: Request, run_id: str, name: str) -> FileResponse:
    record = await _record(request, run_id)
    if record["status"] != "done":
        raise HTTPException(409, f"run {run_id} is {record['status']}: its files are offered once it is done")
    path = results.run_dir(_keeper(request).root, run_id) / name
    return FileResponse(path, media_type="application/octet-stream", filename=f"{run_id}-{name}")


def run_json(request: Request, record: dict) -> dict:
    base = f"{public_base(request, request.app.state.api.settings)}/v1/sampling-runs/{record['id']}"
    labels = record["labels"]
    return {"id": record["id"], "object": "sampling_run", "model": record["model"], "status": record["status"],
            "num_samples": record["num_samples"], "seed": record["seed"], "cfg_scale": record["cfg_scale"],
            "sampler": record["sampler"], "shard_size": record["shard_size"], "priority": record["priority"],
            "label_counts": _counts(labels), "created": record["created"], "finished": record["finished"],
            "error": record["error"], "progress": progress(record), "report": record["report"],
            "links": {"self": base, "events": f"{base}/events", "npz": f"{base}/npz", "stats": f"{base}/stats",
                      "cancel": f"{base}/cancel"}}


def _counts(labels: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for y in labels:
        out[str(y)] = out.get(str(y), 0) + 1
    return out
