"""What handlers receive through dependencies: the app state opened in the lifespan, and the API-key check."""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.metrics import ApiMetrics
from service.api.modelinfo import ModelInfo, load_model_info
from service.jobs import JobStore
from service.settings import Settings


@dataclass
class ApiState:
    """Everything the handlers share, opened once per process by the app's lifespan."""

    settings: Settings
    model: ModelInfo
    redis: redis.Redis              # blocking calls, run in the thread pool (the JobStore contract is sync)
    aredis: aredis.Redis            # event streams: long XREAD BLOCKs must not hold a thread each
    store: JobStore
    metrics: ApiMetrics
    stopping: asyncio.Event = field(default_factory=asyncio.Event)   # the server stops: waits and streams end now
    no_worker_hint: str = "start one with `eqm worker` (or use `eqm serve`)"    # what a 503 tells to do

    @classmethod
    def open(cls, settings: Settings, metrics: ApiMetrics) -> "ApiState":
        if not settings.redis_url:
            raise RuntimeError("no Redis URL: set EQM_REDIS_URL (or run `eqm serve`, which starts its own Redis)")
        model = load_model_info(settings)
        # Timeouts: a dead Redis must turn into a quick 503, not a hung request.
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5,
                                      health_check_interval=30)
        aclient = aredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=30,
                                        health_check_interval=30)
        store = JobStore(client, settings.key_prefix, settings.result_ttl_s)
        return cls(settings, model, client, aclient, store, metrics)

    async def close(self) -> None:
        await self.aredis.aclose()
        self.redis.close()


def get_state(request: Request) -> ApiState:
    return request.app.state.api


bearer = HTTPBearer(auto_error=False, description="an API key, when the server sets EQM_API_KEYS")


def check_api_key(request: Request) -> None:
    """401 unless the server has no keys or the request carries one of them as a bearer token."""
    keys = request.app.state.api.settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip().encode()
    # compare_digest against every key (no early exit): the time taken does not tell which key nearly matched
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key.encode())
    if scheme.lower() != "bearer" or not token or not matched:
        raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """Router dependency: enforces the key and declares the bearer scheme in the OpenAPI schema."""
    check_api_key(request)
