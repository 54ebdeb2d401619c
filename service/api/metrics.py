"""Prometheus metrics of the API process: requests, submissions, and the queue as the API sees it.

The engine's metrics (steps per sample, gradient norms, batch occupancy, job latency) live in each
worker's own registry and endpoint (``service.metrics``); Prometheus scrapes both. The queue depth
is the same series name as the workers' ``eqm_queue_depth`` (``job`` labels tell them apart); the
API refreshes it from Redis at every scrape, so it is current even when no worker runs.
"""
from __future__ import annotations

import time

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ApiMetrics:
    """The API's metrics in their own registry (one per app, so test apps never clash)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.requests_total = Counter(
            "eqm_api_requests_total", "HTTP requests answered, by route template and status.",
            ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "eqm_api_request_seconds", "Time to answer an HTTP request (event streams: until they end).",
            ["method", "route"], buckets=REQUEST_BUCKETS, registry=r)
        self.jobs_submitted_total = Counter(
            "eqm_api_jobs_submitted_total", "Jobs accepted into the queue.", ["kind"], registry=r)
        self.images_requested_total = Counter(
            "eqm_api_images_requested_total", "Images asked for by accepted jobs.", ["kind"], registry=r)
        self.rejected_total = Counter(
            "eqm_api_rejected_total",
            "Requests refused: queue_full, no_worker (submissions), redis_down, redis_full, busy (any request).",
            ["reason"], registry=r)
        self.queue_depth = Gauge(
            "eqm_queue_depth", "Jobs submitted and not yet started (the queued set).", registry=r)
        self.live_workers = Gauge(
            "eqm_live_workers", "Workers whose heartbeat is recent, by model.", ["model"], registry=r)
        self.redis_up = Gauge(
            "eqm_api_redis_up", "1 when the API reached Redis at the last scrape.", registry=r)

    def render(self, store, model: str, heartbeat_s: float) -> bytes:
        """Refresh the Redis-backed gauges, then the exposition text."""
        try:
            self.queue_depth.set(store.queue_depth())
            workers = store.live_workers(heartbeat_s)
            self.live_workers.labels(model).set(sum(1 for w in workers.values() if w.get("model") == model))
            self.redis_up.set(1)
        except redis.RedisError:
            self.redis_up.set(0)
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every request by its route template (``/v1/jobs/{job_id}``), never by its raw path."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests_total.labels(scope["method"], template, str(status)).inc()
            self.metrics.request_seconds.labels(scope["method"], template).observe(time.perf_counter() - start)
