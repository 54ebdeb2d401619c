"""``eqm serve``: the whole service on one machine, in one command.

Starts, in order: Redis (an embedded redis-server on a free local port unless ``EQM_REDIS_URL`` is
set), the worker supervisor (``eqm worker``: one process on the GPU if there is one, else the CPU,
serving ``EQM_CHECKPOINT``, the bundled digits model by default), and the HTTP API (uvicorn, in this
process, on ``EQM_HOST:EQM_PORT``, default 127.0.0.1:8000).

Stopping (Ctrl-C or SIGTERM), in reverse: the API stops taking requests (open event streams get a
few seconds), the workers get SIGTERM and finish or hand back their jobs, then the embedded Redis
stops. Redis and the workers run in their own sessions, so a Ctrl-C reaches only this process, which
stops them in that order. If the workers exit on their own, the API stops too.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import redis

from service.api.modelinfo import load_model_info
from service.embedded_redis import EmbeddedRedis, free_port
from service.jobs import JobStore
from service.settings import Settings

log = logging.getLogger("eqm.serve")

WORKER_GRACE_S = 10.0           # in-flight samples may finish this long after Ctrl-C
API_SHUTDOWN_S = 3              # open connections (event streams) get this long


def default_device() -> str:
    import torch
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class Stack:
    """The processes ``eqm serve`` owns; ``stop()`` ends them in reverse order and is safe to repeat."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis: EmbeddedRedis | None = None
        self.workers: subprocess.Popen | None = None

    def start_redis(self, data_dir: str | None) -> str:
        if self.settings.redis_url:
            client = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=3)
            try:
                client.ping()
            except redis.RedisError as exc:
                raise ConnectionError(f"cannot reach Redis at EQM_REDIS_URL={self.settings.redis_url} ({exc}); "
                                      "unset it to use an embedded one") from None
            finally:
                client.close()
            log.info("using Redis at %s", self.settings.redis_url)
            return self.settings.redis_url
        if data_dir:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(persist=bool(data_dir), workdir=data_dir).start()
        log.info("embedded Redis on %s%s", self.redis.url, f" (append-only file in {data_dir})" if data_dir else "")
        return self.redis.url

    def start_workers(self, redis_url: str, device: str, metrics_port: int, threads: int | None = None) -> None:
        s = self.settings
        argv = [sys.executable, "-m", "service.cli", "worker", "--devices", device, "--redis-url", redis_url,
                "--checkpoint", s.checkpoint, "--prefix", s.key_prefix, "--metrics-port", str(metrics_port),
                "--grace-s", str(WORKER_GRACE_S)]
        if s.vae:
            argv += ["--vae", s.vae]
        if s.model_name:
            argv += ["--model-name", s.model_name]
        if threads:
            argv += ["--threads", str(threads)]
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        # Own session: terminal signals reach only `eqm serve`, which stops the workers after the API.
        self.workers = subprocess.Popen(argv, env=env, start_new_session=True)
        log.info("worker supervisor started (pid %d) on %s, metrics on port %d", self.workers.pid, device, metrics_port)

    def stop(self) -> None:
        if self.workers is not None and self.workers.poll() is None:
            log.info("stopping workers (pid %d)", self.workers.pid)
            self.workers.send_signal(signal.SIGTERM)
            try:
                self.workers.wait(timeout=WORKER_GRACE_S + 20)
            except subprocess.TimeoutExpired:
                log.warning("workers did not stop in time; killing them")
                os.killpg(self.workers.pid, signal.SIGKILL)
                self.workers.wait()
        self.workers = None
        if self.redis is not None:
            log.info("stopping embedded Redis")
            self.redis.stop()
            self.redis = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(settings: Settings, *, device: str | None = None, metrics_port: int | None = None,
          redis_dir: str | None = None, threads: int | None = None, log_level: str = "info") -> int:
    """Run Redis (if needed), the workers and the API until a signal; returns the exit status."""
    import uvicorn

    from service.api.app import create_app
    from service.api.server import uvicorn_options

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s [serve] %(message)s")
    model = load_model_info(settings)                  # a bad checkpoint fails here, before anything starts
    if model.codec == "sd-vae" and not settings.vae:
        raise ValueError(f"{model.config.arch} works in SD-VAE latents: set EQM_VAE to the folder of "
                         "stabilityai/sd-vae-ft-ema (diffusers layout)")
    device = device or settings.device or default_device()
    metrics_port = metrics_port or settings.metrics_port or free_port()
    stack = Stack(settings)
    previous = signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM stops like Ctrl-C: through `finally`
    try:
        redis_url = stack.start_redis(redis_dir)
        settings = replace(settings, redis_url=redis_url)
        stack.start_workers(redis_url, device, metrics_port, threads)
        config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                                timeout_graceful_shutdown=API_SHUTDOWN_S, **uvicorn_options(settings))
        server = uvicorn.Server(config)
        threading.Thread(target=_watch, args=(stack, server, settings, model.name, device, metrics_port),
                         name="serve-watch", daemon=True).start()
        server.run()
        return 0 if stack.workers is None or stack.workers.poll() is None else 1
    except KeyboardInterrupt:
        return 0
    except SystemExit as exc:                           # uvicorn exits this way when it cannot bind the port
        return int(exc.code or 1)
    finally:
        try:
            stack.stop()
        except KeyboardInterrupt:                       # a second Ctrl-C while stopping: stop harder
            if stack.workers is not None:
                os.killpg(stack.workers.pid, signal.SIGKILL)
            if stack.redis is not None:
                stack.redis.stop()
        signal.signal(signal.SIGTERM, previous)


def _watch(stack: Stack, server, settings: Settings, model: str, device: str, metrics_port: int) -> None:
    """Say when the worker is ready; stop the API if the worker supervisor dies."""
    store = JobStore(redis.Redis.from_url(settings.redis_url, socket_timeout=5), settings.key_prefix)
    announced = False
    while not server.should_exit:
        workers = stack.workers
        if workers is None or workers.poll() is not None:
            log.error("the worker supervisor exited (status %s); stopping", None if workers is None else workers.poll())
            server.should_exit = True
            return
        if not announced:
            try:
                live = [w for w in store.live_workers(settings.heartbeat_s).values() if w.get("model") == model]
            except redis.RedisError:
                live = []
            if live and server.started:
                announced = True
                log.info("ready: API on http://%s:%d (docs at /docs), model %s on %s, worker metrics on "
                         "http://127.0.0.1:%d/metrics", settings.host, settings.port, model, device, metrics_port)
        time.sleep(0.5)
