"""One worker process: one device, one ``Engine``, jobs from the shared Redis stream (``python -m service.worker``).

The loop (``loop``: taking jobs, stepping the engine) and its concerns, one module each: the cancel
listener (``cancels``), the heartbeat and fencing (``heartbeat``), result and event writes
(``results``), score jobs (``scores``); its settings and command line are ``service.worker_config``.
"""
from service.worker.entry import main
from service.worker.loop import SetupError, Worker, build_engine
from service.worker_config import EXIT_CONFIG_ERROR, WorkerConfig, config_from_args

__all__ = ["EXIT_CONFIG_ERROR", "SetupError", "Worker", "WorkerConfig", "build_engine", "config_from_args", "main"]
