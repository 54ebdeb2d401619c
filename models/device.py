"""Every CUDA event, pinned buffer, cache and sync call of the serving path, each given its device.

A worker process owns one device (``service/runner.py`` states the invariant). Bare CUDA calls act
on the *current* device: ``torch.cuda.Event().record()`` records on the current device's stream, and
``torch.cuda.empty_cache()`` frees the current device's cache. A worker on ``cuda:1`` whose current
device is still ``cuda:0`` would then read pinned buffers before their copies land (an event on
another GPU's idle stream is done at once) and free nothing. So those calls live here only, each
taking the device, and ``claim_device`` makes the worker's device current before anything else runs.
"""
from __future__ import annotations

import torch


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def claim_device(device: str | torch.device) -> None:
    """Make ``device`` the process's current CUDA device (before any other CUDA call); no-op elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


def record_event(device: str | torch.device):
    """An event recorded on ``device``'s current stream: done when the work queued there so far is done."""
    dev = torch.device(device)
    with torch.cuda.device(dev):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dev))
    return event


def pinned_empty(shape, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A page-locked host buffer for copies to or from ``device`` (allocated under its context)."""
    with torch.cuda.device(torch.device(device)):
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)


def pinned_copy(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A page-locked host copy of host tensor ``t``, for a ``non_blocking`` upload to ``device``."""
    with torch.cuda.device(torch.device(device)):
        return t.pin_memory()


def empty_cache(device: str | torch.device) -> None:
    """Return ``device``'s cached, unused memory to the driver."""
    if is_cuda(device):
        with torch.cuda.device(torch.device(device)):
            torch.cuda.empty_cache()


def synchronize(device: str | torch.device) -> None:
    """Wait for everything queued on ``device``."""
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))
