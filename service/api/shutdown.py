"""What long requests do when the server starts to stop: answer now rather than be cut off."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def unless_stopping(stopping: asyncio.Event, awaitable: Awaitable[T], default: T) -> T:
    """``await awaitable``, or ``default`` as soon as ``stopping`` is set (the awaitable is then cancelled)."""
    if stopping.is_set():
        with contextlib.suppress(BaseException):
            awaitable.close()          # never started
        return default
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return default
