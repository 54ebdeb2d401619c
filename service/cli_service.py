"""``eqm serve`` (everything on one machine) and ``eqm api`` (the HTTP API alone, e.g. in compose).

Both read every setting from ``EQM_*`` environment variables (``service.settings``); the flags
below override the few that are handy on a command line.
"""
from __future__ import annotations

import argparse
import os
import signal


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run Redis, a worker and the API on this machine (no setup needed)",
                       description="Start everything on one machine: an embedded Redis (unless EQM_REDIS_URL is "
                                   "set), one worker process (GPU if present, else CPU) and the HTTP API. Serves the "
                                   "bundled digits model unless EQM_CHECKPOINT (and EQM_VAE for latent models such as "
                                   "EqM-XL/2) name another. Ctrl-C or SIGTERM stops everything.")
    _common(s)
    s.add_argument("--device", help="worker device, e.g. cuda:0 or cpu (default EQM_DEVICE, else cuda:0 if present)")
    s.add_argument("--metrics-port", type=int, help="worker Prometheus port (default EQM_METRICS_PORT, else a free one)")
    s.add_argument("--threads", type=int, help="torch CPU threads of a CPU worker (default: every core; 1 is "
                   "steadier when other busy processes share the cores)")
    s.add_argument("--redis-dir", help="keep the embedded Redis' append-only file in this folder (default: none, "
                   "jobs are lost at exit)")
    s.set_defaults(handler=run_serve)

    a = sub.add_parser("api", help="run the HTTP API only (workers and Redis run elsewhere)",
                       description="Serve the HTTP API with uvicorn. Needs EQM_REDIS_URL (or --redis-url) and the "
                                   "model's checkpoint file (only its description is read, never run).")
    _common(a)
    a.add_argument("--redis-url", help="Redis URL (default EQM_REDIS_URL)")
    a.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    a.set_defaults(handler=run_api)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default EQM_HOST, 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="port to listen on (default EQM_PORT, 8000)")
    p.add_argument("--checkpoint", help="bundled model name or checkpoint file (default EQM_CHECKPOINT, 'digits')")
    p.add_argument("--vae", help="SD-VAE folder for latent models (default EQM_VAE)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _settings(args: argparse.Namespace):
    from service.settings import Settings
    overrides = {name: getattr(args, name, None) for name in ("host", "port", "checkpoint", "vae", "redis_url")}
    return Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})


def run_serve(args: argparse.Namespace) -> int:
    from service.serve import serve
    return serve(_settings(args), device=args.device, metrics_port=args.metrics_port, redis_dir=args.redis_dir,
                 threads=args.threads, log_level=args.log_level)


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.api.modelinfo import load_model_info
    from service.api.server import uvicorn_options
    from service.cli import UsageError

    settings = _settings(args)
    if not settings.redis_url:
        raise UsageError("no Redis: set EQM_REDIS_URL or pass --redis-url (or use `eqm serve`, which starts one)")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    load_model_info(settings)                 # a bad checkpoint is a one-line error here, not a traceback later
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: make that last step a no-op, so a stop
    # asked by docker or systemd ends with status 0 instead of "killed by SIGTERM".
    signal.signal(signal.SIGTERM, lambda *_: None)
    if args.workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                    **uvicorn_options(settings))
        return 0
    # Several processes: each builds its app from the environment, so the overrides travel there.
    os.environ.update({f"EQM_{k.upper()}": str(getattr(settings, k)) for k in ("redis_url", "checkpoint", "vae")})
    uvicorn.run("service.api.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=args.workers, log_level=args.log_level, **uvicorn_options(settings))
    return 0
