"""Prometheus metrics of the engine and the queue, defined once here and registered per process.

Every metric lives in a ``CollectorRegistry`` handed to ``Metrics`` (a fresh one by default), so
several engines or workers in one process (tests, the benchmark) never clash. A worker serves its
registry on its own port with ``serve_metrics``; the API can build ``Metrics(prometheus_client.REGISTRY)``
once at start-up and use the same names (``jobs_total``, ``job_latency_seconds``, ``queue_depth``).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from service.jobstore import JOB_KINDS

# Counters and histograms would each add a ``*_created`` series (a timestamp no dashboard reads): off, once.
disable_created_metrics()

# Gradient updates per sample: the paper's samplers run 1..~1000 updates (250 = the headline setting).
STEP_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 250, 300, 400, 500, 750, 1000)
# ||grad|| at stop: the paper's adaptive threshold on B/2 is 10; small models stop far lower.
GRAD_NORM_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 2, 5, 10, 20, 50, 100, 200, 500)
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

IMAGE_OUTCOMES = ("converged", "step_cap", "deadline", "cancelled")
JOB_OUTCOMES = ("done", "failed", "cancelled")


class Metrics:
    """All service metrics in one registry (``self.registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.steps_per_sample = Histogram(
            "eqm_steps_per_sample", "Gradient updates a sample took before it stopped.",
            ["model", "task"], buckets=STEP_BUCKETS, registry=r)
        self.final_grad_norm = Histogram(
            "eqm_final_grad_norm", "Gradient norm of a sample when it stopped.",
            ["model", "task"], buckets=GRAD_NORM_BUCKETS, registry=r)
        self.images_total = Counter(
            "eqm_images_total", "Samples that left the engine, by how they stopped.",
            ["model", "task", "outcome"], registry=r)
        self.jobs_total = Counter(
            "eqm_jobs_total", "Jobs that reached a final status.", ["model", "outcome"], registry=r)
        self.batch_occupancy = Gauge(
            "eqm_batch_occupancy_ratio", "Active model rows / capacity rows at the last engine step.", registry=r)
        self.step_seconds = Histogram(
            "eqm_step_seconds", "Wall time of one engine step (schedule, forward, fused step, retire).",
            buckets=STEP_SECONDS_BUCKETS, registry=r)
        self.job_latency_seconds = Histogram(
            "eqm_job_latency_seconds", "From job submission to its last image.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.nfe_total = Counter(
            "eqm_nfe_total", "Model rows evaluated (function evaluations), padding excluded.", registry=r)
        self.queue_depth = Gauge(
            "eqm_queue_depth", "Jobs submitted and not yet started (the queued set).", registry=r)


    def precreate(self, model: str) -> None:
        """Create every known label combination at 0 when the engine starts, so the first image of a task
        shows in rate() / increase() (a series born at 1 shows no increase). Tasks are the job kinds."""
        for task in JOB_KINDS:
            self.steps_per_sample.labels(model, task)
            self.final_grad_norm.labels(model, task)
            for outcome in IMAGE_OUTCOMES:
                self.images_total.labels(model, task, outcome)
        for outcome in JOB_OUTCOMES:
            self.jobs_total.labels(model, outcome)
        self.job_latency_seconds.labels(model)


def serve_metrics(metrics: Metrics, port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` of this registry on ``port`` from a daemon thread."""
    start_http_server(port, addr=addr, registry=metrics.registry)
