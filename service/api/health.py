"""Operations endpoints: liveness, readiness and Prometheus metrics (no API key), and the workers'
metrics targets (behind the API key when keys are on: they name internal hosts and ports)."""
from __future__ import annotations

import gzip
from urllib.parse import urlsplit

import redis
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from service.api.deps import ApiState, check_api_key, get_state, require_api_key
from service.api.metrics import worker_label
from service.api.schemas import Health, Readiness, error_responses
from service.jobstore import worker_serves

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the API process answers")
def healthz() -> Health:
    return Health(status="ok")


def _has_key(request: Request) -> bool:
    """True when the server has no keys or the request carries a valid one."""
    try:
        check_api_key(request)
    except HTTPException:
        return False
    return True


@router.get("/readyz", response_model=Readiness, summary="Readiness: Redis reachable and a live worker",
            responses={503: {"model": Readiness, "description": "not ready (the body says why)",
                             "headers": error_responses(503)[503]["headers"]}})
def readyz(state: ApiState = Depends(get_state)):
    """Ready when Redis answers and at least one worker serving the model sent a heartbeat within three
    heartbeat periods. Jobs submitted while not ready are refused with 503."""
    try:
        state.redis.ping()
        workers = state.store.live_workers(state.settings.heartbeat_s)
        depth = state.store.queue_depth()
    except redis.RedisError as exc:
        # The class of the error only: the message names Redis' host and port, which probes need not see.
        body = Readiness(status="not ready", redis=False, workers=0, detail=f"Redis unreachable ({type(exc).__name__})")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    per_model = {name: sum(1 for w in workers.values() if worker_serves(w, name)) for name in state.models}
    serving = sum(1 for w in workers.values() if any(worker_serves(w, name) for name in state.models))
    idle = [name for name, count in per_model.items() if not count]
    if not serving:
        body = Readiness(status="not ready", redis=True, workers=0, queue_depth=depth,
                         detail=f"no live worker serves model {' or '.join(repr(m) for m in state.models)}")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "10"})
    # Ready while any served model has a worker: a model scaled to zero must not take the others down.
    without = f"; none serves {', '.join(repr(m) for m in idle)}" if idle else ""
    return Readiness(status="ready", redis=True, workers=serving, queue_depth=depth,
                     detail=f"{serving} worker(s) serve {', '.join(repr(m) for m in per_model if per_model[m])}{without}")


@router.get("/metrics", response_class=Response, summary="Prometheus metrics of the API and its live workers",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
def metrics(request: Request, state: ApiState = Depends(get_state)) -> Response:
    """Requests, submissions and the queue depth (refreshed from Redis at each scrape), and the live
    workers' engine metrics (label ``worker``) unless the server sets ``EQM_METRICS_FROM_WORKERS=false``;
    each worker also serves them on its own port: see ``/sd/workers``. With API keys on, ``worker`` names
    the worker's host:port only for a request with a key (else an opaque name): no key is needed, and none
    reveals internal addresses."""
    body = state.metrics.render(state.store, list(state.models), state.settings.heartbeat_s,
                                show_addresses=_has_key(request))
    if "gzip" in request.headers.get("accept-encoding", ""):        # Prometheus asks for it: ~10x fewer bytes
        return Response(gzip.compress(body, compresslevel=1), media_type=CONTENT_TYPE_LATEST,
                        headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Vary": "Accept-Encoding"})


class TargetGroup(BaseModel):
    """One group of Prometheus' HTTP service discovery format."""
    targets: list[str] = Field(description="host:port of a worker's metrics endpoint", examples=[["worker-1:9400"]])
    labels: dict[str, str] = Field(description="worker (host:port), device, and __metrics_path__ when not /metrics")


@router.get("/sd/workers", summary="Prometheus HTTP service discovery of the workers' metrics endpoints",
            dependencies=[Depends(require_api_key)], response_model=list[TargetGroup],
            responses={200: {"description": "a list of {targets, labels} groups (Prometheus http_sd format)"},
                       **error_responses(401)})
def worker_targets(state: ApiState = Depends(get_state)) -> JSONResponse:
    """Each live worker that serves metrics, as ``host:port`` with its device as a label and ``worker`` =
    ``host:port`` (stable across restarts): point Prometheus' ``http_sd_configs`` here to scrape every
    worker on every machine. ``models`` lists the models the process serves (comma-separated; a process
    holding several models is one target); the workers' series carry their own ``model``. Empty while this
    API's ``/metrics`` includes the workers' series (``EQM_METRICS_FROM_WORKERS``, on by default, as with
    ``eqm serve``): then scraping them again would count every series twice."""
    if state.settings.metrics_from_workers:
        return JSONResponse([])
    groups: dict[str, dict] = {}
    for name, info in sorted(state.store.live_workers(state.settings.heartbeat_s).items()):
        url = info.get("metrics_url") or ""
        if not url:
            continue
        models = [str(m) for m in (info.get("models") or [info.get("model", "")])]
        if url in groups:               # several models of one process: one endpoint, one target
            known = groups[url]["labels"]["models"].split(",")
            groups[url]["labels"]["models"] = ",".join(sorted(set(known) | set(models)))
            continue
        parts = urlsplit(url)
        labels = {"worker": worker_label(url), "device": str(info.get("device", "")), "models": ",".join(sorted(models))}
        if parts.path and parts.path != "/metrics":
            labels["__metrics_path__"] = parts.path
        groups[url] = {"targets": [parts.netloc], "labels": labels}
    return JSONResponse(list(groups.values()))
