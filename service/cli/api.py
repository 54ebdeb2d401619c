"""``eqm api``: the HTTP API alone (workers and Redis run elsewhere, e.g. in compose)."""
from __future__ import annotations

import argparse
import os
import signal

from service.cli.common import check_checkpoint_file, common_arguments, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("api", help="run the HTTP API only (workers and Redis run elsewhere)",
                       description="Serve the HTTP API with uvicorn. Needs EQM_REDIS_URL (or --redis-url) and the "
                                   "model's checkpoint file (only its description is read, never run).")
    common_arguments(a)
    a.add_argument("--redis-url", help="Redis URL (default EQM_REDIS_URL)")
    a.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    a.set_defaults(handler=run_api)


def run_api(args: argparse.Namespace) -> int:
    from service.cli import UsageError

    # What can be checked without torch is checked first: these errors come at once, not after the imports.
    settings = settings_from_args(args)
    if not settings.redis_url:
        raise UsageError("no Redis: set EQM_REDIS_URL or pass --redis-url (or use `eqm serve`, which starts one)")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    check_checkpoint_file(args, settings)

    import uvicorn

    from service.api.app import create_app
    from service.api.modelinfo import load_model_info
    from service.api.server import uvicorn_options

    load_model_info(settings)                 # a bad checkpoint is a one-line error here, not a traceback later
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: make that last step a no-op, so a stop
    # asked by docker or systemd ends with status 0 instead of "killed by SIGTERM".
    signal.signal(signal.SIGTERM, lambda *_: None)
    if args.workers == 1:
        from service.serve import stopping_server
        app = create_app(settings)
        stopping_server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                                       **uvicorn_options(settings)), app).run()
        return 0
    # Several processes: each builds its app from the environment, so the overrides travel there.
    os.environ.update({f"EQM_{k.upper()}": str(getattr(settings, k)) for k in ("redis_url", "checkpoint", "vae")})
    uvicorn.run("service.api.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=args.workers, log_level=args.log_level, **uvicorn_options(settings))
    return 0
