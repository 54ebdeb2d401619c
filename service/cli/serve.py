"""``eqm serve``: Redis, a worker and the API on one machine, in one command.

Every setting comes from ``EQM_*`` environment variables (``service.settings``); the flags below
override the few that are handy on a command line. Shared with ``eqm api``: ``common_arguments``.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run Redis, a worker and the API on this machine (no setup needed)",
                       description="Start everything on one machine: an embedded Redis (unless EQM_REDIS_URL is "
                                   "set), one worker process (GPU if present, else CPU) and the HTTP API, which opens "
                                   "its port once the worker is ready. Serves the bundled digits model unless "
                                   "EQM_CHECKPOINT (and EQM_VAE for latent models such as EqM-XL/2) name another. "
                                   "Ctrl-C or SIGTERM stops everything; no process outlives it.")
    common_arguments(s)
    s.add_argument("--device", help="worker device, e.g. cuda:0 or cpu (default EQM_DEVICE, else cuda:0 if present)")
    s.add_argument("--metrics-port", type=int, help="worker Prometheus port (default EQM_METRICS_PORT, else a free "
                   "one); its metrics are also on the API's /metrics")
    s.add_argument("--threads", type=int, help="torch CPU threads of a CPU worker (default 1: 7-11x the images/s "
                   "of 2 threads with the bundled model on a shared machine, bench/RESULTS.md; 0 = every core)")
    s.add_argument("--redis-dir", help="keep the embedded Redis' append-only file in this folder (default: none, "
                   "jobs are lost at exit)")
    s.set_defaults(handler=run_serve)


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default EQM_HOST, 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port to listen on (default EQM_PORT, 8000)")
    p.add_argument("--checkpoint", help="bundled model name or checkpoint file (default EQM_CHECKPOINT, 'digits')")
    p.add_argument("--vae", help="SD-VAE folder for latent models (default EQM_VAE)")
    p.add_argument("--ebm", choices=["none", "dot", "l2", "mean"],
                   help="energy form of a checkpoint that records none (official --ebm; default EQM_EBM)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace):
    from service.settings import Settings
    overrides = {name: getattr(args, name, None) for name in ("host", "port", "checkpoint", "vae", "redis_url", "ebm")}
    return Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})


def check_checkpoint_file(args: argparse.Namespace, settings) -> None:
    """A served checkpoint that is neither a bundled name nor a file: one line naming where the name came from
    (the flag or the variable the user set), before torch and the API's modules load (seconds)."""
    from models import BUNDLED, resolve_checkpoint
    from service.cli import UsageError
    path = resolve_checkpoint(settings.checkpoint)
    if path.is_file():
        return
    source = f"--checkpoint {args.checkpoint}" if getattr(args, "checkpoint", None) else \
        f"EQM_CHECKPOINT={settings.checkpoint}"
    if settings.checkpoint in BUNDLED:
        raise UsageError(f"{source}: the bundled file {path} is missing (it ships with the package: reinstall it)")
    what = "a folder, not a checkpoint file" if path.is_dir() else "no such file"
    raise UsageError(f"{source}: {what} (a checkpoint file: .pt or .safetensors, or a bundled model: "
                     f"{', '.join(BUNDLED)})")


def run_serve(args: argparse.Namespace) -> int:
    from service.cli import UsageError
    settings = settings_from_args(args)
    if args.threads is not None and args.threads < 0:
        raise UsageError(f"--threads must be >= 0 (0 = every core), got {args.threads}")
    check_checkpoint_file(args, settings)
    from service.serve import serve
    return serve(settings, device=args.device, metrics_port=args.metrics_port,
                 redis_dir=args.redis_dir, threads=args.threads, log_level=args.log_level)
