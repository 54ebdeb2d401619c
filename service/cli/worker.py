"""``eqm worker``: one worker process per device, restarted when it crashes.

``eqm worker --devices cuda:0,cuda:1`` (default: every GPU, else ``cpu``) starts
``python -m service.worker --device D`` for each device in its own session (terminal signals reach
only the supervisor, which forwards them) and with its Prometheus port ``--metrics-port + index``.
Workers never outlive the supervisor: each gets SIGKILL from the kernel when it dies (Linux), even
by ``kill -9``; unfinished jobs then stay pending in Redis and are reclaimed.
A device that cannot run (``cuda`` without CUDA, an index past the last GPU) is an error at once.
A worker that exits while the supervisor is not stopping is restarted after a back-off (1 s,
doubling to 30 s while it keeps failing within a minute of its start); one that exits with code 2
(bad checkpoint, codec or settings) stops everything instead, since a restart cannot help. SIGTERM/SIGINT: every worker
gets SIGTERM, finishes or hands back its jobs within ``--grace-s``, and the supervisor exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from service.lifecycle import die_with_parent
from service.worker_config import (EXIT_CONFIG_ERROR, add_worker_arguments, check_device, config_from_args,
                                   default_devices, worker_flags)

log = logging.getLogger("eqm.supervisor")

BACKOFF_START_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1.0, 30.0, 60.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run GPU (or CPU) workers that take jobs from Redis",
                       description="Start one worker process per device; each takes jobs from the shared Redis "
                                   "stream, runs them with continuous batching and stores the results. Workers "
                                   "on other machines join by using the same --redis-url.")
    p.add_argument("--devices", help="comma-separated torch devices (default: every GPU, else cpu); "
                   "repeat a device to run several workers on it")
    p.add_argument("--metrics-port", type=int, help="Prometheus port of the first worker; worker i uses port + i "
                   "(default EQM_METRICS_PORT; 0 = off)")
    add_worker_arguments(p)
    p.set_defaults(handler=run_worker)


@dataclass
class _Child:
    index: int
    device: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None


class Supervisor:
    """Keeps one worker process per device alive until asked to stop."""

    def __init__(self, children: list[tuple[str, list[str]]], grace_s: float):
        self.children = [_Child(i, dev, argv) for i, (dev, argv) in enumerate(children)]
        self.grace_s = grace_s
        self.stopping = False

    def _start(self, child: _Child) -> None:
        # The repository root on the path, so ``-m service.worker`` imports from any working directory.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        child.proc = subprocess.Popen(child.argv, start_new_session=True, env=env,
                                      preexec_fn=die_with_parent(signal.SIGKILL))
        child.started = time.monotonic()
        child.restart_at = None
        log.info("worker %d on %s started (pid %d)", child.index, child.device, child.proc.pid)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for child in self.children:
            self._start(child)
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at and not self.stopping:
                        self._start(child)
                    continue
                rc = child.proc.poll()
                if rc is None:
                    continue
                if rc == EXIT_CONFIG_ERROR:
                    log.error("worker %d on %s cannot start (see its error above); stopping", child.index, child.device)
                    self._shutdown()
                    return EXIT_CONFIG_ERROR
                if now - child.started > HEALTHY_AFTER_S:
                    child.backoff_s = BACKOFF_START_S
                log.warning("worker %d on %s (pid %d) exited with %s; restarting in %.0fs",
                            child.index, child.device, child.proc.pid, rc, child.backoff_s)
                child.restart_at = now + child.backoff_s
                child.backoff_s = min(BACKOFF_MAX_S, 2 * child.backoff_s)
            time.sleep(0.1)
        return self._shutdown()

    def _on_signal(self, signum, _frame) -> None:
        if self.stopping:     # second signal: workers hand back at once
            for child in self.children:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
        self.stopping = True

    def _shutdown(self) -> int:
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None and c.restart_at is None]
        for child in live:
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 15.0
        for child in live:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d (pid %d) did not stop in time; killing it", child.index, child.proc.pid)
                child.proc.kill()
                child.proc.wait()
        log.info("all workers stopped")
        return 0


def run_worker(args: argparse.Namespace) -> int:
    from service.cli.common import check_checkpoint_file, checkpoint_overrides
    from service.settings import Settings
    # A missing checkpoint is one line at once, before torch loads (service.worker imports it).
    check_checkpoint_file(args, Settings.from_env(**checkpoint_overrides(args.checkpoint)))
    import service.worker  # noqa: F401  the worker's imports: a package this machine lacks fails here, not in a child
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [supervisor] %(message)s")
    cfg = config_from_args(args, metrics_port=args.metrics_port)      # validates settings and the Redis URL
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else default_devices()
    if not devices:
        raise ValueError("--devices: no device given")
    for device in devices:
        check_device(device)
    children = []
    for i, device in enumerate(devices):
        argv = [sys.executable, "-m", "service.worker", "--device", device, *worker_flags(cfg),
                "--parent-pid", str(os.getpid())]
        if device != "cpu":
            argv = _without(argv, "--threads")
        if cfg.metrics_port:
            argv += ["--metrics-port", str(cfg.metrics_port + i)]
        children.append((device, argv))
    return Supervisor(children, cfg.grace_s).run()


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag`` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]
