"""Service settings: one object, read from the environment once (``EQM_*`` variables)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields


def _env(name: str, default, cast):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


_bool.__name__ = "boolean"
_list.__name__ = "comma-separated list"


@dataclass(frozen=True)
class Settings:
    """Every knob of the service. ``Settings.from_env()`` reads ``EQM_<NAME>`` for each field."""

    redis_url: str = ""                      # empty: `eqm serve` starts an embedded redis-server
    key_prefix: str = "eqm"                  # all Redis keys start with "<prefix>:"
    checkpoint: str = "digits"               # bundled name or path of the model to serve
    checkpoints: tuple[str, ...] = ()        # several models behind one API (the first is the default; overrides checkpoint)
    model_name: str = ""                     # public name of the model (default: derived from the checkpoint)
    vae: str = ""                            # SD-VAE folder for latent models
    ebm: str = ""                            # energy form of a checkpoint that records none ("" = what it records)
    device: str = ""                         # worker device ("" = cuda if available else cpu)
    dtype: str = "auto"                      # model dtype on the worker: auto = bfloat16 on CUDA, float32 elsewhere
    compile: str = "off"                     # worker forward per bucket: off | compile (torch.compile) | cudagraphs
    result_ttl_s: int = 3600                 # job records and images expire after this
    max_queue: int = 1000                    # queued jobs beyond this get 429
    max_images_per_job: int = 64
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = 16_000_000      # decompression-bomb guard, checked before decoding
    wait_timeout_s: float = 60.0             # longest ?wait=true
    api_keys: tuple[str, ...] = ()           # empty: no authentication
    admin_keys: tuple[str, ...] = ()         # keys that also see and cancel every key's jobs
    redis_pool_size: int = 64                # API: Redis connections per process (event streams share one)
    upload_decodes: int = 2                  # API: uploads decoded at once per process (memory bound)
    header_timeout_s: float = 10.0           # API: a request's headers must arrive within this
    body_timeout_s: float = 30.0             # API: longest wait for the next chunk of a request body
    body_deadline_s: float = 120.0           # API: a whole request body must arrive within this
    max_connections: int = 2000              # API: open connections per process beyond this get 503 (health: +64)
    capacity: int = 64                       # worker sample slots
    max_rows: int = 0                        # worker model rows (0 = 3 x capacity)
    claim_idle_ms: int = 30_000              # a pending job idle this long is reclaimed by another worker
    heartbeat_s: float = 2.0                 # workers refresh their liveness (and their jobs' claims) this often
    max_deliveries: int = 3                  # a job delivered more often than this is dead-lettered
    metrics_port: int = 0                    # worker Prometheus endpoint (0 = none)
    metrics_from_workers: bool = True        # the API's /metrics includes the live workers' eqm_* series
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""                     # base of absolute links (default: the request's, X-Forwarded-* honoured)
    cors_origins: tuple[str, ...] = ()       # browser origins allowed by CORS (empty: CORS off; "*" = any)
    webhook_secret: str = ""                 # Standard Webhooks signing key "whsec_<base64>" (empty: webhooks off)
    webhook_allowed_hosts: tuple[str, ...] = ()  # hosts ("host" or "host:port") webhooks may go to (empty: none)
    webhook_retry_window_s: float = 3600.0   # a delivery is retried with back-off for this long after its event
    webhook_max_backoff_s: float = 60.0      # longest wait between two attempts of one delivery
    results_dir: str = ""                    # sampling runs' results store, shared by API and workers ("" = ~/.cache/eqm/results)
    max_run_samples: int = 100_000           # images per sampling run beyond this get 422

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values = {}
        for f in fields(cls):
            cast = {bool: _bool, int: int, float: float, str: str}.get(type(f.default), _list)
            values[f.name] = _env(f"EQM_{f.name.upper()}", f.default, cast)
        values.update(overrides)
        return cls(**values)

    @property
    def served_checkpoints(self) -> tuple[str, ...]:
        """The checkpoints this deployment serves, the default first."""
        return self.checkpoints or (self.checkpoint,)

    @property
    def rows(self) -> int:
        return self.max_rows or 3 * self.capacity
