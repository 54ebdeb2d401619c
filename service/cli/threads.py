"""``--threads`` of the offline commands (``sample``, ``eval``, ``eval-digits``, ``train-digits``): the CPU worker's rule.

A small model gains nothing from more than one torch CPU thread: its ops are too small to split, and the
extra OpenMP threads spin against whatever else runs on the machine. On a loaded 2-core machine torch's
default (one thread per core) made the sampling of ``eqm sample`` 7x (digits) to 21x (em-digits) slower
than one thread (``bench/RESULTS.md``, "Offline commands: torch CPU threads"), the effect the worker
measured ("CPU worker threads"). So, as the worker does, a CPU run of a small model takes one thread unless asked.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

# A checkpoint file under this size holds a small model (the bundled ones are 3-5 MB; EqM-S/2 is ~130 MB).
SMALL_MODEL_BYTES = 64 * 2**20

THREADS_HELP = ("torch CPU threads; default: 1 on a CPU for a small model (a checkpoint under 64 MB, as the "
                "bundled ones: more threads only slow it), else OMP_NUM_THREADS if set, else every core; "
                "0 = torch's default")


def add_threads_argument(p: argparse.ArgumentParser, help_text: str = THREADS_HELP) -> None:
    p.add_argument("--threads", type=int, default=None, help=help_text)


def default_threads(device: str | None, checkpoint: Path | None, small: bool | None = None) -> int:
    """1 for a small model on the CPU, else 0 (leave torch's count: OMP_NUM_THREADS, or every core).
    ``small``: known without a file (the quality judge's network), else read from the checkpoint's size."""
    on_cpu = device.split(":")[0] == "cpu" if device else not _cuda_available()
    if small is None:
        try:
            small = checkpoint is not None and checkpoint.stat().st_size < SMALL_MODEL_BYTES
        except OSError:
            small = False
    if on_cpu and small and "OMP_NUM_THREADS" not in os.environ:
        return 1
    return 0


def apply_threads(requested: int | None, device: str | None, checkpoint: Path | None,
                  small: bool | None = None) -> int:
    """Set torch's intra-op thread count from ``--threads`` (or the default rule); returns the count in use."""
    from service.cli import UsageError
    if requested is not None and requested < 0:
        raise UsageError(f"--threads must be >= 0 (0 = torch's default), got {requested}")
    import torch
    threads = default_threads(device, checkpoint, small) if requested is None else requested
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()
