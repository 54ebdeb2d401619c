"""What handlers receive through dependencies: the app state opened in the lifespan, and the API-key check."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.events import EventHub
from service.api.replays import ReplayPages
from service.api.metrics import ApiMetrics
from service.api.modelinfo import ModelInfo, load_model_infos
from service.jobstore import JobStore
from service.settings import Settings

log = logging.getLogger("eqm.api")


@dataclass
class ApiState:
    """Everything the handlers share, opened once per process by the app's lifespan."""

    settings: Settings
    models: dict[str, ModelInfo]    # every served model by name, the default first
    redis: redis.Redis              # blocking calls, run in the thread pool (the JobStore contract is sync)
    aredis: aredis.Redis            # short async calls; a bounded pool that waits for a free connection
    store: JobStore
    metrics: ApiMetrics
    events: EventHub                # one reader for every event stream and wait of the process
    decodes: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))   # upload decoding
    stopping: asyncio.Event = field(default_factory=asyncio.Event)   # the server stops: waits and streams end now
    no_worker_hint: str = "start one with `eqm worker` (or use `eqm serve`)"    # what a 503 tells to do
    replays: ReplayPages = field(default_factory=ReplayPages)    # replay pages shared by streams opening at once

    @classmethod
    def open(cls, settings: Settings, metrics: ApiMetrics) -> "ApiState":
        if not settings.redis_url:
            raise RuntimeError("no Redis URL: set EQM_REDIS_URL (or run `eqm serve`, which starts its own Redis)")
        models = load_model_infos(settings)
        # Timeouts: a dead Redis must turn into a quick 503, not a hung request.
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5,
                                      health_check_interval=30)
        # A blocking pool: a burst beyond its size waits (up to 10 s) for a connection instead of failing.
        pool = aredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=settings.redis_pool_size,
                                                      timeout=10, socket_connect_timeout=2, socket_timeout=10,
                                                      health_check_interval=30)
        aclient = aredis.Redis(connection_pool=pool)
        store = JobStore(client, settings.key_prefix, settings.result_ttl_s)
        return cls(settings, models, client, aclient, store, metrics, EventHub(settings.redis_url),
                   asyncio.Semaphore(max(1, settings.upload_decodes)))

    @property
    def model(self) -> ModelInfo:
        """The default model: what a request that names none gets."""
        return next(iter(self.models.values()))

    def pick_model(self, requested: str | None) -> ModelInfo:
        """The model a request names (None or "" = the default); ``UnknownModel`` (404) lists the served ones."""
        if not requested:
            return self.model
        found = self.models.get(requested)
        if found is None:
            raise UnknownModel(requested, list(self.models))
        return found

    def redis_full(self) -> bool:
        """Whether Redis is at its ``maxmemory`` (it then refuses writes under ``noeviction``)."""
        info = self.redis.info("memory")
        limit = int(info.get("maxmemory", 0))
        return limit > 0 and int(info.get("used_memory", 0)) >= limit

    async def close(self) -> None:
        """Each step bounded: closing a Redis connection can wait on a socket that never reports closed,
        and a shutdown that hangs keeps the port and every client's stream."""
        await bounded(self.events.close(), "the event reader")
        await bounded(self.aredis.aclose(), "the async Redis client")
        await bounded(self.aredis.connection_pool.disconnect(), "the async Redis pool")
        self.redis.close()


CLOSE_TIMEOUT_S = 5.0


async def bounded(step, what: str, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Await one shutdown step for at most ``timeout_s``; past it, log and go on with the next."""
    try:
        await asyncio.wait_for(step, timeout_s)
    except asyncio.TimeoutError:
        log.warning("closing %s took over %.0fs; going on without it", what, timeout_s)


class UnknownModel(HTTPException):
    """404: a request named a model this deployment does not serve (the OpenAI routes answer ``model_not_found``)."""

    def __init__(self, requested: str, served: list[str]):
        super().__init__(404, f"unknown model {requested!r}: this server serves {', '.join(repr(m) for m in served)} "
                              "(see GET /v1/models)")
        self.requested, self.served = requested, served


def get_state(request: Request) -> ApiState:
    return request.app.state.api


bearer = HTTPBearer(auto_error=False, description="an API key, when the server sets EQM_API_KEYS")


def key_id(key: str) -> str:
    """What a job record keeps of the key that made it: a digest, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def check_api_key(request: Request) -> None:
    """401 unless the server has no keys or the request carries one of them as a bearer token. Sets
    ``request.state.api_key_id`` (None without keys) and ``request.state.api_admin``."""
    settings = request.app.state.api.settings
    keys, admins = settings.api_keys, settings.admin_keys
    request.state.api_key_id, request.state.api_admin = None, False
    if not keys and not admins:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip(" \t").encode()          # HTTP whitespace only: a key + U+00A0 is another key
    # compare_digest against every key (no early exit): the time taken does not tell which key nearly matched
    matched = admin = False
    for key in keys:
        matched |= hmac.compare_digest(token, key.encode())
    for key in admins:
        admin |= hmac.compare_digest(token, key.encode())
    if scheme.lower() != "bearer" or not token or not (matched or admin):
        raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    request.state.api_key_id, request.state.api_admin = key_id(token.decode()), admin


def may_see(request: Request, owner: str | None) -> bool:
    """With keys on, a job is visible (and cancellable) only with the key that made it, or an admin key."""
    settings = request.app.state.api.settings
    if not settings.api_keys and not settings.admin_keys:
        return True
    if getattr(request.state, "api_key_id", None) is None:      # the route did not check a key: be safe
        check_api_key(request)
    return bool(request.state.api_admin) or (owner is not None and owner == request.state.api_key_id)


def require_api_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """Router dependency: enforces the key and declares the bearer scheme in the OpenAPI schema."""
    check_api_key(request)
