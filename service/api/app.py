"""The FastAPI application: wires the routers, the lifespan (model description + Redis) and error shapes.

``create_app(settings)`` builds one app; ``app_from_env()`` is the factory uvicorn imports
(``eqm api``). Handlers get the shared state through ``deps.get_state``; nothing is global.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse

from service.api import catalog, compositions, denoise, generations, health, jobs
from service.api.deps import ApiState
from service.api.metrics import ApiMetrics, RequestMetricsMiddleware
from service.jobs import is_oom
from service.settings import Settings

log = logging.getLogger("eqm.api")

DESCRIPTION = """\
Equilibrium Matching (EqM) image generation as a service. EqM learns one time-invariant gradient field;
images are made by **gradient descent** on it, so every image can stop on its own once its gradient norm
is small (adaptive compute), a noisy image can be denoised by starting the descent from it, and classes
can be composed by adding their fields.

Jobs are asynchronous: a POST answers `202` with the job's links; follow `links.events` (server-sent
events) or poll `links.self`, then download `links.images`. `?wait=true` answers when the job is done.

Errors: `{"detail": "one line"}`; validation errors (`422`) list each field's location and reason.
When the server sets `EQM_API_KEYS`, every `/v1` request needs `Authorization: Bearer <key>`.
"""

TAGS = [
    {"name": "jobs", "description": "create jobs, follow them, download their images, cancel them"},
    {"name": "models", "description": "the served model's classes and defaults"},
    {"name": "operations", "description": "health, readiness and Prometheus metrics (no API key)"},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await run_in_threadpool(ApiState.open, settings, metrics)
        try:
            await run_in_threadpool(state.store.ensure_group)
        except redis.RedisError as exc:           # Redis may come up after the API (compose): not fatal
            log.warning("Redis not reachable yet (%s); /readyz says so until it is", exc)
        state.events.start()
        app.state.api = state
        log.info("serving model %s (%s, %dx%d, %d classes)", state.model.name, state.model.config.arch,
                 state.model.image_size, state.model.image_size, state.model.num_classes)
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="EqM inference service", version=_package_version(), description=DESCRIPTION,
                  openapi_tags=TAGS, lifespan=lifespan)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(redis.RedisError, redis_unavailable)
    for module in (generations, compositions, denoise, jobs, catalog, health):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app


def _package_version() -> str:
    try:
        return version("eqm-serve")
    except PackageNotFoundError:          # running from a source tree that was never installed
        return "0.0.0"


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.api.app:app_from_env`` (settings from EQM_* variables)."""
    return create_app(Settings.from_env())


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each field's location and reason, plus the first one as a sentence (inputs not echoed)."""
    detail = []
    for err in exc.errors():
        loc = [part if isinstance(part, int) else str(part) for part in err.get("loc", ())]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        detail.append({"loc": loc, "msg": msg, "type": str(err.get("type", "value_error"))})
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    return JSONResponse({"detail": detail, "message": f"{where}: {first['msg']}" if where else first["msg"]},
                        status_code=422)


async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
    """A Redis error as the client should read it: 507 when Redis is full (nothing was written: every
    write of a request is one script or transaction), 503 when this process has no free connection
    left or Redis cannot be reached; both with Retry-After."""
    log.warning("Redis error on %s %s: %s", request.method, request.url.path, exc)
    state = getattr(request.app.state, "api", None)
    if is_oom(exc):
        reason, status, detail = "redis_full", 507, ("the job store (Redis) is out of memory (maxmemory reached); "
                                                     "nothing was written; retry later")
    elif isinstance(exc, redis.ConnectionError) and "No connection available" in str(exc):
        reason, status, detail = "busy", 503, ("the API is busy: every Redis connection of this process is in use; "
                                               "retry shortly")
    else:
        reason, status, detail = "redis_down", 503, "the job store (Redis) is unavailable; retry shortly"
    if state is not None:
        state.metrics.rejected_total.labels(reason).inc()
    return JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": "5"})
