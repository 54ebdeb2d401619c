"""``eqm serve``: the whole service on one machine, in one command.

Before anything starts, the configuration is checked: the checkpoint, the device (``cuda`` on a
machine without CUDA is an error, not a restart loop), the API port (bound now and held, so nothing
can take it) and the worker's metrics port. Any of them wrong: one line on stderr, exit status 2.

Then, in order: Redis (an embedded redis-server on a free local port unless ``EQM_REDIS_URL`` is
set), the worker supervisor (``eqm worker``: one process on the GPU if there is one, else the CPU,
serving ``EQM_CHECKPOINT``, the bundled digits model by default), and, once a worker serving the
model is registered, the HTTP API (uvicorn, in this process, on ``EQM_HOST:EQM_PORT``, default
127.0.0.1:8000). The port accepts connections only from then on, so the first request never meets a
service without a worker. The API's ``/metrics`` includes the workers' metrics.

Stopping (Ctrl-C or SIGTERM), in reverse: the API stops taking requests; ``?wait=true`` requests
answer at once with the job as it is (202, its id and status) and event streams end with a
``stopping`` event; the workers get SIGTERM and finish or hand back their jobs; then the embedded
Redis stops. A second Ctrl-C hurries the workers (jobs handed back at once). Redis and the workers
run in their own sessions, so a Ctrl-C reaches only this process, which stops them in that order;
they also get a signal from the kernel if this process dies (``kill -9``), so none outlives it.
If the workers exit on their own, the API stops too.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import redis

from service.embedded_redis import EmbeddedRedis, free_port
from service.jobstore import JobStore, worker_serves
from service.lifecycle import die_with_parent
from service.settings import Settings
from service.worker_config import WorkerConfig, check_device, worker_flags

log = logging.getLogger("eqm.serve")

WORKER_GRACE_S = 10.0           # in-flight samples may finish this long after Ctrl-C
API_SHUTDOWN_S = 3              # open connections get this long (waits and streams end at once)
HURRIED_STOP_S = 5.0            # after a second Ctrl-C, workers get this long to hand jobs back


def default_device() -> str:
    import torch
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class Stack:
    """The processes ``eqm serve`` owns; ``stop()`` ends them in reverse order and is safe to repeat."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis: EmbeddedRedis | None = None
        self.workers: subprocess.Popen | None = None
        self._stop_signals = 0               # SIGTERMs sent to the supervisor: the second one means hurry

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
        cfg = WorkerConfig.from_settings(self.settings, redis_url=redis_url, grace_s=WORKER_GRACE_S,
                                         metrics_port=metrics_port, metrics_host=self.settings.host, threads=threads)
        argv = [sys.executable, "-m", "service.cli", "worker", "--devices", device, "--metrics-port", str(metrics_port),
                *worker_flags(cfg)]
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        # Own session: terminal signals reach only `eqm serve`, which stops the workers after the API.
        # SIGKILL if this process dies (kill -9): the supervisor's workers die with it in turn.
        self.workers = subprocess.Popen(argv, env=env, start_new_session=True,
                                        preexec_fn=die_with_parent(signal.SIGKILL))
        log.info("worker supervisor started (pid %d) on %s, metrics on port %d", self.workers.pid, device, metrics_port)

    def wait_for_worker(self, store: JobStore, models: list[str], heartbeat_s: float) -> int | None:
        """Block until a worker serving each of ``models`` is registered (None), or the supervisor exits (its status)."""
        while True:
            code = self.workers.poll()
            if code is not None:
                return code
            try:
                live = store.live_workers(heartbeat_s).values()
                if all(any(worker_serves(w, m) for w in live) for m in models):
                    return None
            except redis.RedisError:
                pass
            time.sleep(0.2)

    def stop(self, hurry: bool = False) -> None:
        if self.workers is not None and self.workers.poll() is None:
            log.info("stopping workers (pid %d)%s", self.workers.pid, ": handing jobs back now" if hurry else "")
            for _ in range(2 - self._stop_signals if hurry else 1):     # a second one tells it to hurry
                self.workers.send_signal(signal.SIGTERM)
                self._stop_signals += 1
                time.sleep(0.1)
            try:
                self.workers.wait(timeout=HURRIED_STOP_S if hurry else WORKER_GRACE_S + 20)
            except subprocess.TimeoutExpired:
                log.warning("workers did not stop in time; killing them")
                self.workers.kill()                         # its workers get SIGKILL from the kernel
                self.workers.wait()
        self.workers = None
        if self.redis is not None:
            log.info("stopping embedded Redis")
            self.redis.stop()
            self.redis = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def bind_port(host: str, port: int, flag: str) -> socket.socket:
    """The API's socket, bound now (not listening yet): a busy port is an error before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)    # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server running? "
                         f"pass {flag} another port") from None
    sock.set_inheritable(False)
    return sock


def check_port_free(host: str, port: int, flag: str) -> None:
    bind_port(host, port, flag).close()


def stopping_server(config, app, on_started=None):
    """uvicorn's server, made to tell the app when it starts to stop (before it waits for connections),
    so ``?wait=true`` requests and event streams answer at once instead of being cut. ``on_started`` is
    called once it listens, before it handles a request."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if on_started is not None and not self.should_exit:
                on_started()

        async def shutdown(self, sockets=None):
            state = getattr(app.state, "api", None)
            if state is not None:
                state.stopping.set()
            await super().shutdown(sockets=sockets)

    return StoppingServer(config)


def serve(settings: Settings, *, device: str | None = None, metrics_port: int | None = None,
          redis_dir: str | None = None, threads: int | None = None, log_level: str = "info") -> int:
    """Run Redis (if needed), the workers and the API until a signal; returns the exit status."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s [serve] %(message)s")
    metrics_port = metrics_port or settings.metrics_port or free_port()
    check_port_free(settings.host, metrics_port, "--metrics-port")
    api_socket = bind_port(settings.host, settings.port, "--port")     # held from now on: nobody else takes it
    try:
        return _serve(settings, api_socket, device=device, metrics_port=metrics_port, redis_dir=redis_dir,
                      threads=threads, log_level=log_level)
    finally:
        api_socket.close()


def _serve(settings: Settings, api_socket: socket.socket, *, device: str | None, metrics_port: int,
           redis_dir: str | None, threads: int | None, log_level: str) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.api.modelinfo import load_model_infos
    from service.api.server import uvicorn_options

    import service.worker  # noqa: F401  the worker's imports: a package this machine lacks fails here, not in a child
    models = load_model_infos(settings)                # a bad checkpoint fails here, before anything starts
    for model in models.values():
        if model.codec == "sd-vae" and not settings.vae:
            raise ValueError(f"{model.config.arch} works in SD-VAE latents: set EQM_VAE to the folder of "
                             "stabilityai/sd-vae-ft-ema (diffusers layout)")
    names = ", ".join(models)
    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    device = check_device(device or settings.device or default_device())
    stack = Stack(settings)
    previous = signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM stops like Ctrl-C: through `finally`
    server = None
    try:
        redis_url = stack.start_redis(redis_dir)
        settings = replace(settings, redis_url=redis_url)
        stack.start_workers(redis_url, device, metrics_port, threads)
        store = JobStore(redis.Redis.from_url(redis_url, socket_timeout=5), settings.key_prefix)
        log.info("loading %s %s on %s; the API opens on http://%s:%d once the worker is ready",
                 "models" if len(models) > 1 else "model", names, device, settings.host, settings.port)
        code = stack.wait_for_worker(store, list(models), settings.heartbeat_s)
        if code is not None:
            log.error("the worker could not start (status %s, its error is above); stopping", code)
            return code
        app = create_app(settings, no_worker_hint="`eqm serve` restarts its worker when it stops; retry in a few "
                                                  "seconds (its log says why it stopped)")
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                                timeout_graceful_shutdown=API_SHUTDOWN_S, **uvicorn_options(settings))
        server = stopping_server(config, app, on_started=lambda: log.info(
            "ready: API on http://%s:%d (docs at /docs, metrics of the API and the workers at /metrics), %s %s "
            "on %s", settings.host, settings.port, "models" if len(models) > 1 else "model", names, device))
        threading.Thread(target=_watch, args=(stack, server), name="serve-watch", daemon=True).start()
        server.run(sockets=[api_socket])
        return 0 if stack.workers is None or stack.workers.poll() is None else 1
    except KeyboardInterrupt:
        return 0
    except SystemExit as exc:                           # uvicorn exits this way when it cannot start
        return int(exc.code or 1)
    finally:
        api_socket.close()                              # the API is closed before the workers stop
        signal.signal(signal.SIGINT, _interrupt)
        try:
            stack.stop(hurry=server is not None and server.force_exit)     # Ctrl-C twice while the API stopped
        except KeyboardInterrupt:                       # a second Ctrl-C while stopping: hand back now
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stack.stop(hurry=True)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _watch(stack: Stack, server) -> None:
    """Stop the API if the worker supervisor dies."""
    while not server.should_exit:
        workers = stack.workers
        if workers is None or workers.poll() is not None:
            log.error("the worker supervisor exited (status %s); stopping", None if workers is None else workers.poll())
            server.should_exit = True
            return
        time.sleep(0.2)
