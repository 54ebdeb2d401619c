"""A worker's settings and command line: one place for the flags, the config they make and the argv that
passes them on (the supervisor to each worker, ``eqm serve`` to the supervisor)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from service.settings import Settings

EXIT_CONFIG_ERROR = 2      # bad checkpoint / codec / settings: restarting would not help


@dataclass
class WorkerConfig:
    redis_url: str
    checkpoint: str = "digits"
    checkpoints: tuple[str, ...] = ()   # several models in one process (service.worker.many); () = checkpoint alone
    device: str = "cpu"
    key_prefix: str = "eqm"
    model_name: str = ""
    vae: str = ""
    ebm: str = ""                       # energy form for a checkpoint that records none ("" = recorded / none)
    dtype: str = "auto"                 # auto: bfloat16 on CUDA, float32 elsewhere (service.runner.model_dtype)
    compile: str = "off"                # off | compile | cudagraphs (service.runner.COMPILE_MODES)
    capacity: int = 64
    max_rows: int = 0                   # 0 = 3 x capacity
    claim_idle_ms: int = 30_000
    heartbeat_s: float = 2.0
    max_deliveries: int = 3
    result_ttl_s: int = 3600
    metrics_port: int = 0               # 0 = no endpoint
    metrics_host: str = "127.0.0.1"     # where the endpoint binds (default: where the API binds, EQM_HOST)
    grace_s: float = 10.0               # shutdown: how long in-flight samples may still run
    progress_interval_s: float = 0.3    # progress events per job at most this often
    threads: int = 1                    # torch CPU threads (0 = torch's default: every core); 1 gave 7-11x the
                                        # images/s of 2 for the bundled model on a shared CPU (bench/RESULTS.md)
    name: str = ""                      # consumer name (default host:pid:device)
    parent_pid: int = 0                 # exit gracefully when this process goes away (supervised)
    warmup: bool = True
    results_dir: str = ""               # sampling-run shards are written here ("" = service.runs.store.default_root)

    @property
    def rows(self) -> int:
        return self.max_rows or 3 * self.capacity

    @classmethod
    def from_settings(cls, settings: Settings, **overrides) -> "WorkerConfig":
        base = dict(redis_url=settings.redis_url, checkpoint=settings.served_checkpoints[0],
                    checkpoints=settings.served_checkpoints, key_prefix=settings.key_prefix,
                    model_name=settings.model_name, vae=settings.vae, ebm=settings.ebm, dtype=settings.dtype, compile=settings.compile,
                    device=settings.device or _default_device(), capacity=settings.capacity,
                    max_rows=settings.max_rows, claim_idle_ms=settings.claim_idle_ms,
                    heartbeat_s=settings.heartbeat_s, max_deliveries=settings.max_deliveries,
                    result_ttl_s=settings.result_ttl_s, metrics_port=settings.metrics_port,
                    metrics_host=settings.host, results_dir=settings.results_dir)
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "checkpoint" in overrides and overrides["checkpoint"] is not None and "checkpoints" not in overrides:
            base["checkpoints"] = (base["checkpoint"],)
        return cls(**base)


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def config_from_args(args: argparse.Namespace, **extra) -> WorkerConfig:
    settings = Settings.from_env()
    names = ("redis_url", "checkpoint", "model_name", "vae", "ebm", "dtype", "compile", "capacity", "max_rows", "key_prefix",
             "claim_idle_ms", "heartbeat_s", "max_deliveries", "grace_s", "threads", "metrics_host")
    overrides = {n: getattr(args, n, None) for n in names}
    if isinstance(overrides["checkpoint"], list):       # --checkpoint is repeatable: every model to serve
        overrides["checkpoints"] = tuple(overrides["checkpoint"])
        overrides["checkpoint"] = overrides["checkpoint"][0]
    overrides.update(extra)
    cfg = WorkerConfig.from_settings(settings, **overrides)
    if not cfg.redis_url:
        raise ValueError("no Redis URL: pass --redis-url or set EQM_REDIS_URL")
    return cfg


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``python -m service.worker`` and ``eqm worker`` (defaults: EQM_* settings)."""
    p.add_argument("--redis-url", help="Redis URL (default EQM_REDIS_URL)")
    p.add_argument("--checkpoint", action="append",
                   help="bundled model name or checkpoint file; repeat it to serve several models from one process "
                        "(default EQM_CHECKPOINTS, else EQM_CHECKPOINT, else 'digits')")
    p.add_argument("--model-name", help="public model name in metrics and records (default: checkpoint name)")
    p.add_argument("--vae", help="SD-VAE folder for latent models (default EQM_VAE)")
    p.add_argument("--ebm", choices=["none", "dot", "l2", "mean"],
                   help="energy form of a checkpoint that records none (official --ebm; default EQM_EBM, else "
                        "what the file records, else none)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (default EQM_DTYPE, auto: bfloat16 on CUDA, float32 elsewhere; float32 on CUDA "
                        "turns TF32 on; the iterate stays float32)")
    p.add_argument("--compile", choices=["off", "compile", "cudagraphs"],
                   help="forward per row bucket through torch.compile or CUDA graphs (default EQM_COMPILE, off)")
    p.add_argument("--capacity", type=int, help="sample slots per worker (default EQM_CAPACITY, 64)")
    p.add_argument("--max-rows", type=int, help="model rows per worker (default 3 x capacity)")
    p.add_argument("--prefix", dest="key_prefix", help="Redis key prefix (default EQM_KEY_PREFIX, 'eqm')")
    p.add_argument("--claim-idle-ms", type=int, help="reclaim a dead worker's job after this idle time")
    p.add_argument("--heartbeat-s", type=float, help="heartbeat period in seconds")
    p.add_argument("--max-deliveries", type=int, help="dead-letter a job delivered more often than this")
    p.add_argument("--grace-s", type=float, default=10.0, help="on SIGTERM, let in-flight samples run this long")
    p.add_argument("--threads", type=int, help="torch CPU threads per CPU worker (default 1: "
                   "7-11x the images/s of 2 threads with the bundled model on a shared machine, bench/RESULTS.md; "
                   "0 = torch's default, every core)")
    p.add_argument("--metrics-host", help="address the metrics endpoint binds (default EQM_HOST, 127.0.0.1, where "
                   "the API binds; 0.0.0.0 for Prometheus on other machines)")


def default_devices() -> list[str]:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def check_device(device: str) -> str:
    """``device`` if this machine can run it, else a one-line error (before any process starts)."""
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device {device!r}: only cpu and cuda devices are served")
    return device


def worker_flags(cfg: WorkerConfig) -> list[str]:
    """The command-line flags that give a worker (or a supervisor of workers) the settings of ``cfg``."""
    argv = ["--redis-url", cfg.redis_url]
    for checkpoint in cfg.checkpoints or (cfg.checkpoint,):
        argv += ["--checkpoint", checkpoint]
    argv += ["--capacity", str(cfg.capacity),
            "--max-rows", str(cfg.rows), "--prefix", cfg.key_prefix, "--claim-idle-ms", str(cfg.claim_idle_ms),
            "--heartbeat-s", str(cfg.heartbeat_s), "--max-deliveries", str(cfg.max_deliveries),
            "--grace-s", str(cfg.grace_s), "--dtype", cfg.dtype, "--compile", cfg.compile,
            "--metrics-host", cfg.metrics_host, "--threads", str(cfg.threads)]
    named = len(cfg.checkpoints) <= 1           # several models are named by their files
    for flag, value in (("--ebm", cfg.ebm), ("--vae", cfg.vae), ("--model-name", cfg.model_name if named else "")):
        if value:
            argv += [flag, value]
    return argv
