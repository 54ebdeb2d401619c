"""``python -m service.worker``: parse the flags, then run one model (``loop.Worker``) or several (``many``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from models.codecs import CodecError
from models.files import CheckpointError
from service.worker.loop import SetupError, Worker
from service.worker.many import run_models
from service.worker_config import EXIT_CONFIG_ERROR, add_worker_arguments, check_device, config_from_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.worker", description="one EqM worker process on one device")
    add_worker_arguments(p)
    p.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default EQM_DEVICE, else cuda if present)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = off)")
    p.add_argument("--name", help="consumer name (default host:pid:device)")
    p.add_argument("--parent-pid", type=int, default=0, help="stop when this process exits (set by the supervisor)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [worker {os.getpid()}] %(message)s")
    try:
        cfg = config_from_args(args, device=args.device, metrics_port=args.metrics_port, name=args.name,
                               parent_pid=args.parent_pid)
        check_device(cfg.device)
    except ValueError as exc:
        print(f"eqm worker: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        if len(cfg.checkpoints) > 1:
            return run_models(cfg)
        worker = Worker(cfg)
        worker.install_signal_handlers()
        return worker.run()
    except (CheckpointError, CodecError, SetupError) as exc:
        # A setup error, not a crash: exit code 2 tells the supervisor not to restart.
        print(f"eqm worker: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
