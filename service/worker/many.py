"""Several models in one worker process on one device: an engine per model, each model's loop in its own thread.

``python -m service.worker --checkpoint A --checkpoint B`` (``eqm worker`` passes its repeated
``--checkpoint`` on; ``EQM_CHECKPOINTS=A,B`` does the same). Every model is loaded before any job is read,
so a checkpoint that fails to load stops the process with its one-line error, as with one model. Each
model then runs the ordinary ``Worker`` loop on its own stream (``P:jobs:<model>``) under its own consumer
name (``<name>:<model>``), so reclaim, fencing and dead letters stay per model, and no model's backlog
waits behind another's: the loops step independently (a forward releases the GIL), fair by construction.
All models share one metrics registry (every job series is labelled by model) and one endpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path

from service.metrics import Metrics, serve_metrics
from service.worker.loop import SetupError, Worker, build_engine
from service.worker_config import WorkerConfig

log = logging.getLogger("eqm.worker")


def model_configs(cfg: WorkerConfig) -> list[WorkerConfig]:
    """One config per served checkpoint: its own model name (the file's stem) and consumer name."""
    base = cfg.name or f"{socket.gethostname()}:{os.getpid()}:{cfg.device}"
    out = []
    for checkpoint in cfg.checkpoints:
        model = Path(checkpoint).stem
        out.append(replace(cfg, checkpoint=checkpoint, checkpoints=(checkpoint,), model_name="",
                           name=f"{base}:{model}", metrics_port=0))
    return out


def run_models(cfg: WorkerConfig) -> int:
    """Load every model, then run one loop per model until a signal (or the supervisor's exit)."""
    metrics = Metrics()
    configs = model_configs(cfg)
    names = [Path(c.checkpoint).stem for c in configs]
    if len(set(names)) != len(names):
        raise SetupError(f"two checkpoints share a model name ({', '.join(names)}); a model's name is its file's stem")
    workers = [Worker(c, engine=build_engine(c, metrics), metrics=metrics) for c in configs]
    if cfg.metrics_port:
        try:
            serve_metrics(metrics, cfg.metrics_port, cfg.metrics_host)
        except OSError as exc:
            raise SetupError(f"metrics port {cfg.metrics_port} on {cfg.metrics_host}: {exc.strerror or exc}; "
                             "pass another --metrics-port") from None
        host = cfg.metrics_host if cfg.metrics_host not in ("", "0.0.0.0", "::") else socket.gethostname()
        for w in workers:
            w._metrics_url = f"http://{host}:{cfg.metrics_port}/metrics"
    codes: dict[str, int] = {}

    def run(worker: Worker) -> None:
        try:
            codes[worker.model] = worker.run()
        except BaseException:                       # a crash of one model stops the process (the supervisor restarts it)
            log.exception("model %s: the loop crashed; stopping the other models", worker.model)
            codes[worker.model] = 1
            for other in workers:
                other.request_stop(hurry=True)

    def stop(*_):
        for w in workers:
            w.request_stop()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
    threads = [threading.Thread(target=run, args=(w,), name=f"model-{w.model}") for w in workers]
    for t in threads:
        t.start()
    log.info("serving %d models on %s: %s", len(workers), cfg.device, ", ".join(w.model for w in workers))
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)                     # short joins: the main thread keeps taking signals
    return max(codes.values(), default=0)
