"""The FastAPI application: wires the routers, the lifespan (model description + Redis) and error shapes.

``create_app(settings)`` builds one app; ``app_from_env()`` is the factory uvicorn imports
(``eqm api``). Handlers get the shared state through ``deps.get_state``; nothing is global.
The interactive docs (``/docs``, Swagger UI; ``/redoc``) load their scripts and styles from this
server (the ``fastapi-offline`` package ships them), so they work with no internet; their pages also
carry a Content-Security-Policy that keeps the browser on this server. ReDoc's script is served without
its remote logo (``service.api.redoc_script``), so ``/redoc`` asks for nothing the policy refuses.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import (batches, catalog, compositions, denoise, generations, health, inpaint, jobs, listing,
                         openai_images, sampling_runs, scores)
from service.api.errors import (FASTAPI_BODY_ERROR, body_fields, malformed_json_reason, unknown_field_message,
                               validation_message)
from service.api.deps import ApiState
from service.api.metrics import ApiMetrics, RequestMetricsMiddleware
from service.api.redoc_script import serve_local_redoc_script
from service.api.openapi_schema import finish_openapi, operation_id
from service.jobstore import is_oom, worker_serves
from service.settings import Settings
from service.webhooks import WebhookDispatcher

log = logging.getLogger("eqm.api")

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "static" / "playground"

DESCRIPTION = """\
Equilibrium Matching (EqM) image generation as a service. EqM learns one time-invariant gradient field;
images are made by **gradient descent** on it, so every image can stop on its own once its gradient norm
is small (adaptive compute), a noisy image can be denoised by starting the descent from it, and classes
can be composed by adding their fields.

Jobs are asynchronous: a POST answers `202` with the job's links; follow `links.events` (server-sent
events) or poll `links.self`, then download `links.images`. `?wait=true` answers when the job is done.

Client conventions: `Prefer: wait=N` (RFC 7240) waits like `?wait=true`; `?inline=true` puts finished images
in the JSON (base64); `Idempotency-Key` on a POST returns the original job for a repeated request; links are
absolute; `GET /v1/jobs` lists your jobs; `webhook` sends a job's events as signed POSTs (Standard Webhooks).
OpenAI-compatible `/v1/images/generations` and `/v1/images/edits` answer synchronously in OpenAI's shape;
`/v1/scores` gives the energy score (gradient norm) of uploaded images.

Errors: `{"detail": "one line"}`; validation errors (`422`) list each field's location and reason.
When the server sets `EQM_API_KEYS`, every `/v1` request needs `Authorization: Bearer <key>`.
"""

TAGS = [
    {"name": "jobs", "description": "create jobs, follow them, download their images, cancel them"},
    {"name": "models", "description": "the served model's classes and defaults"},
    {"name": "openai", "description": "OpenAI-compatible images API (synchronous; errors in OpenAI's shape)"},
    {"name": "scores", "description": "energy score: how far an image is from the data (out-of-distribution)"},
    {"name": "operations", "description": "health, readiness and Prometheus metrics (no API key)"},
]


DOCS_ASSETS = "/docs-assets"        # Swagger UI and ReDoc scripts, styles and icon, served from the package
DOCS_PAGES = ("/docs", "/redoc")
# Everything from this server; inline scripts and styles are how both pages start; ReDoc runs a blob: worker.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


# The playground page: requests and images from this server only, never in a frame.
PLAYGROUND_HEADERS = {"Content-Security-Policy": "connect-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                                 "frame-ancestors 'none'; base-uri 'self'; form-action 'self'",
                      "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"}


class DocsPolicyMiddleware:
    """Adds ``DOCS_CSP`` to the answers of the docs pages (nothing else is touched)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in DOCS_PAGES:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", DOCS_CSP.encode())]
            await send(message)

        await self.app(scope, receive, send_with_policy)


def create_app(settings: Settings | None = None, *, no_worker_hint: str | None = None) -> FastAPI:
    """``no_worker_hint``: what a 503 "no live worker" tells the user to do (``eqm serve`` has its own)."""
    settings = settings or Settings.from_env()
    metrics = ApiMetrics(worker_metrics=settings.metrics_from_workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await run_in_threadpool(ApiState.open, settings, metrics)
        metrics.precreate(list(state.models))
        try:
            for name in state.models:
                await run_in_threadpool(state.store.ensure_group, name)
            await run_in_threadpool(fail_removed_models, state)
        except redis.RedisError as exc:           # Redis may come up after the API (compose): not fatal
            log.warning("Redis not reachable yet (%s); /readyz says so until it is", exc)
        if no_worker_hint:
            state.no_worker_hint = no_worker_hint
        state.events.start(state.stopping)
        app.state.api = state
        hooks = start_webhooks(state)
        runs = sampling_runs.start_runs(app, state)          # sampling runs and batches: one keeper thread
        for m in state.models.values():
            log.info("serving model %s (%s, %dx%d, %d classes)%s", m.name, m.config.arch, m.image_size,
                     m.image_size, m.num_classes, " (default)" if m is state.model else "")
        try:
            yield
        finally:
            if hooks is not None:
                await run_in_threadpool(hooks.stop)
            await run_in_threadpool(runs.stop)
            await state.close()

    app = FastAPIOffline(title="EqM inference service", version=_package_version(), description=DESCRIPTION,
                         openapi_tags=TAGS, lifespan=lifespan, static_url=DOCS_ASSETS,
                         generate_unique_id_function=operation_id)
    serve_local_redoc_script(app, DOCS_ASSETS)
    finish_openapi(app, api_keys_required=bool(settings.api_keys or settings.admin_keys))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(DocsPolicyMiddleware)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(redis.RedisError, redis_unavailable)
    for module in (generations, compositions, denoise, inpaint, listing, jobs, scores, openai_images, catalog, health,
                   sampling_runs, batches):
        app.include_router(module.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Location", "Retry-After", "Preference-Applied",
                                                                "Idempotent-Replayed", "X-EqM-Job-Id"])

    # The playground: static files of this package, nothing fetched from elsewhere.
    app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground")

    @app.get("/", include_in_schema=False)
    def root() -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html", headers={"Cache-Control": "no-cache", **PLAYGROUND_HEADERS})

    return app


def fail_removed_models(state: ApiState) -> None:
    """Jobs queued for a model this deployment no longer serves, with no live worker left for it, would wait
    forever: fail them, saying why (their clients' waits and streams end with that reason)."""
    workers = state.store.live_workers(state.settings.heartbeat_s).values()
    for model in state.store.queued_models():
        if model in state.models or any(worker_serves(w, model) for w in workers):
            continue
        reason = (f"model {model!r} was removed from this deployment while the job was queued; it serves "
                  f"{', '.join(repr(m) for m in state.models)}: submit the job again with one of them")
        failed = state.store.fail_removed_model(model, reason)
        log.warning("model %s is no longer served: %d queued job(s) failed", model, failed)


def start_webhooks(state: ApiState) -> WebhookDispatcher | None:
    """The webhook dispatcher of this process, when the server signs webhooks (``service.webhooks``)."""
    if not state.settings.webhook_secret:
        return None
    return WebhookDispatcher(state.redis, state.settings).start()


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
        if err.get("type") == "extra_forbidden" and len(loc) == 2 and loc[0] == "body":
            msg = unknown_field_message(str(loc[1]), body_fields(request))
        detail.append({"loc": loc, "msg": msg, "type": str(err.get("type", "value_error"))})
    message, _ = validation_message(request, list(exc.errors()))
    return JSONResponse({"detail": detail, "message": message}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's own answer, except for a JSON body its decoder could not take (see ``FASTAPI_BODY_ERROR``):
    a 422 that says why, like any other malformed JSON."""
    if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
        reason = malformed_json_reason(exc.__cause__)
        detail = [{"loc": ["body"], "msg": f"the body is {reason}" if reason.startswith("not") else
                   f"the body is not usable JSON: {reason}", "type": "json_invalid"}]
        return JSONResponse({"detail": detail, "message": f"body: {detail[0]['msg']}"}, status_code=422)
    return await http_exception_handler(request, exc)


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
