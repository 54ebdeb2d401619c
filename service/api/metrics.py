"""Prometheus metrics of the API process: requests, submissions, and the queue as the API sees it.

One page for a user: the engine's metrics (steps per sample, gradient norms, batch occupancy, step
time, job latency) live in each worker's own registry and endpoint (``service.metrics``), and the
API's ``/metrics`` includes them too: at each scrape it reads every live worker's endpoint (from the
worker registry in Redis, 1 s timeout each) and adds its ``eqm_*`` series with a ``worker`` label,
plus ``eqm_worker_metrics_up{worker}`` (0 when an endpoint did not answer); ``worker`` is the endpoint's
``host:port`` (with API keys on and none sent: an opaque name, since ``/sd/workers`` keeps the addresses
behind a key). Series the API has itself
(``eqm_queue_depth``, process metrics) are not repeated. ``EQM_METRICS_FROM_WORKERS=0`` turns this
off, for a Prometheus that scrapes the workers directly (the compose setup, through ``/sd/workers``).
One source per deployment: ``/sd/workers`` lists the workers only when this page does not include them,
so the shipped Prometheus config counts no series twice whichever way the API runs. The queue depth is refreshed from Redis at every scrape, so it is
current even when no worker runs.
"""
from __future__ import annotations

import gzip
import hashlib
import hmac
import secrets
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import redis
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.jobstore import JOB_KINDS, worker_serves

disable_created_metrics()          # no ``*_created`` series beside each counter and histogram
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WORKER_SCRAPE_TIMEOUT_S = 1.0
# The ``method`` label takes these values and "other": a client's made-up method must not create series.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
REJECT_REASONS = ("queue_full", "no_worker", "redis_down", "redis_full", "busy")
SUBMITTED_KINDS = (*JOB_KINDS, "score")


def worker_label(metrics_url: str) -> str:
    """A worker's ``worker`` label: its metrics endpoint ``host:port``, stable across restarts (the
    worker's name carries its PID, which would start new series at every restart)."""
    return urlsplit(metrics_url).netloc or metrics_url


class WorkerMetrics:
    """A collector of the live workers' ``eqm_*`` series; ``targets`` ({worker: url}) is set before each scrape."""

    def __init__(self, skip: set[str]):
        self.skip = skip                      # families the API exports itself
        self.targets: dict[str, str] = {}

    def collect(self):
        families: dict[str, Metric] = {}
        up = GaugeMetricFamily("eqm_worker_metrics_up", "1 when the worker's metrics endpoint answered this scrape.",
                               labels=["worker"])
        for worker, url in sorted(self.targets.items()):
            try:
                with urllib.request.urlopen(url, timeout=WORKER_SCRAPE_TIMEOUT_S) as resp:
                    text = resp.read().decode("utf-8")
            except (OSError, ValueError):
                up.add_metric([worker], 0)
                continue
            up.add_metric([worker], 1)
            for family in text_string_to_metric_families(text):
                if not family.name.startswith("eqm_") or family.name in self.skip:
                    continue
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
        yield from families.values()
        if self.targets:
            yield up


class ApiMetrics:
    """The API's metrics in their own registry (one per app, so test apps never clash)."""

    def __init__(self, registry: CollectorRegistry | None = None, worker_metrics: bool = False):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._render_lock = threading.Lock()
        self._label_key = secrets.token_bytes(16)
        r = self.registry
        ProcessCollector(registry=r)
        self.requests_total = Counter(
            "eqm_api_requests_total", "HTTP requests answered, by route template and status.",
            ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "eqm_api_request_seconds", "Time to answer an HTTP request (event streams: until they end).",
            ["method", "route"], buckets=REQUEST_BUCKETS, registry=r)
        self.jobs_submitted_total = Counter(
            "eqm_api_jobs_submitted_total", "Jobs accepted into the queue.", ["kind", "model"], registry=r)
        self.images_requested_total = Counter(
            "eqm_api_images_requested_total", "Images asked for by accepted jobs.", ["kind", "model"], registry=r)
        self.rejected_total = Counter(
            "eqm_api_rejected_total",
            "Requests refused: queue_full, no_worker (submissions), redis_down, redis_full, busy (any request).",
            ["reason"], registry=r)
        self.queue_depth = Gauge(
            "eqm_queue_depth", "Jobs submitted and not yet started (the queued set).", registry=r)
        for reason in REJECT_REASONS:           # at 0 from the start: the first refusal shows in increase()
            self.rejected_total.labels(reason)
        self.model_queue_depth = Gauge(
            "eqm_model_queue_depth", "Jobs submitted and not yet started, by model (its queued set).", ["model"],
            registry=r)
        self.queue_lag = Gauge(
            "eqm_model_queue_lag", "Entries of a model's stream not yet read by any worker (what KEDA scales on).",
            ["model"], registry=r)
        self.live_workers = Gauge(
            "eqm_live_workers", "Workers whose heartbeat is recent, by model.", ["model"], registry=r)
        self.redis_up = Gauge(
            "eqm_api_redis_up", "1 when the API reached Redis at the last scrape.", registry=r)
        self.workers: WorkerMetrics | None = None
        if worker_metrics:
            self.workers = WorkerMetrics(skip={family.name for family in r.collect()})
            r.register(self.workers)

    def precreate(self, models: list[str]) -> None:
        """Every (kind, served model) series at 0 from the start, so the first submission shows in increase().
        Only served models ever get a label: the values stay bounded."""
        for model in models:
            self.model_queue_depth.labels(model)
            self.queue_lag.labels(model)
            for kind in SUBMITTED_KINDS:
                self.jobs_submitted_total.labels(kind, model)
                self.images_requested_total.labels(kind, model)

    def render(self, store, models: list[str], heartbeat_s: float, show_addresses: bool = True) -> bytes:
        """Refresh the Redis-backed gauges, then the exposition text. Without ``show_addresses`` the
        ``worker`` label is an opaque name instead of the worker's host:port (``opaque_worker_label``)."""
        try:
            self.queue_depth.set(store.queue_depth())
            workers = store.live_workers(heartbeat_s)
            for model in models:        # the served models only: the label's values stay bounded
                self.live_workers.labels(model).set(
                    sum(1 for w in workers.values() if worker_serves(w, model)))
                self.model_queue_depth.labels(model).set(store.queue_depth(model))
                self.queue_lag.labels(model).set(store.stream_lag(model))
            self.redis_up.set(1)
        except redis.RedisError:
            self.redis_up.set(0)
            workers = {}
        name = worker_label if show_addresses else self.opaque_worker_label
        with self._render_lock:            # the targets are the collector's state: one scrape at a time
            if self.workers is not None:
                self.workers.targets = {name(w["metrics_url"]): w["metrics_url"] for w in workers.values()
                                        if w.get("metrics_url")}
            return generate_latest(self.registry)

    def opaque_worker_label(self, metrics_url: str) -> str:
        """A worker's label for callers without a key: the same worker gets the same name while this
        process runs, and the name does not give its address away (keyed with a secret of the process)."""
        digest = hmac.new(self._label_key, worker_label(metrics_url).encode(), hashlib.sha256).hexdigest()
        return f"worker-{digest[:12]}"


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
        root_path = scope.get("root_path", "")

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            template = _route_template(dict(scope, root_path=root_path))
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests_total.labels(method, template, str(status)).inc()
            self.metrics.request_seconds.labels(method, template).observe(time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    """The template of the route that answered: FastAPI's own routes (``/openapi.json``) and mounts
    (``/docs-assets``) leave no ``route`` in the scope, so they are matched here; else "unmatched"."""
    route = scope.get("route")
    if route is None:
        for candidate in getattr(scope.get("app"), "routes", ()):
            if candidate.matches(scope)[0] is Match.FULL:
                route = candidate
                break
    return getattr(route, "path", None) or "unmatched"
