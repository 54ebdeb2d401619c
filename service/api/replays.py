"""What many event streams of one job share when they open at once, and what one stream may hold.

A client that opens a job's event stream first gets what happened so far (the replay), read from
Redis a page at a time. A thousand clients opening on one running 64-image job used to read and frame
the same pages a thousand times over (each page thousands of entries of kilobytes each) and join each
page into one chunk of its own: hundreds of megabytes at once, and pooled Redis connections held long
enough that later opens found none free. Here:

- ``ReplayPages`` reads each page once for every stream that asks for it within ``SHARED_FOR_S``
  (one ``XREAD`` in flight per page, its framed events shared); a page read earlier is at worst a
  little short at its end, and the shared reader delivers the rest;
- ``chunks`` cuts the frames a stream writes into pieces of at most ``CHUNK_BYTES``, made of the
  shared frames themselves, so what one stream holds beyond the shared frames is one piece and the
  socket's buffer, whatever the size of the job's events;
- and once a large hold has ended, ``events.FreeHeap`` hands the freed heap back to the system.
"""
from __future__ import annotations

import asyncio
import time
from typing import Iterator

from service.api.events import Event, event_of
from service.jobstore import FINAL_STATUSES

REPLAY_PAGE = 500            # entries per replay read
SHARED_FOR_S = 2.0           # a page read for one stream serves the streams that ask this soon after
CHUNK_BYTES = 64 * 1024      # the most one write of a stream joins (a larger frame goes out in slices)


class ReplayPages:
    """Replay pages (framed events after an id) read once for every stream that opens at about the same time."""

    def __init__(self):
        self._pages: dict[tuple[str, str], tuple[float, asyncio.Task]] = {}
        self.reads = 0                  # XREADs made (one per page, however many streams asked)

    async def page(self, aredis, key: str, after: str) -> list[Event]:
        """The events of ``key`` after the id ``after``, at most ``REPLAY_PAGE``, oldest first."""
        hit = self._pages.get((key, after))
        if hit is None:
            task = asyncio.ensure_future(self._read(aredis, key, after))
            task.add_done_callback(lambda t, k=(key, after): self._forget_failed(k, t))
            hit = self._pages[(key, after)] = (time.monotonic(), task)
            asyncio.get_running_loop().call_later(SHARED_FOR_S, self._drop, (key, after), task)
        return await asyncio.shield(hit[1])       # a stream that goes away leaves the read to the others

    def _drop(self, key: tuple[str, str], task: asyncio.Task) -> None:
        current = self._pages.get(key)
        if current is not None and current[1] is task:
            if task.done():
                del self._pages[key]
            else:                                  # still reading (Redis slow): look again later
                asyncio.get_running_loop().call_later(SHARED_FOR_S, self._drop, key, task)

    async def _read(self, aredis, key: str, after: str) -> list[Event]:
        self.reads += 1
        reply = await aredis.xread({key: after}, count=REPLAY_PAGE)
        entries = reply[0][1] if reply else []
        return [event_of(entry_id, fields) for entry_id, fields in entries]

    def _forget_failed(self, key: tuple[str, str], task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:      # never serve an error to later streams
            current = self._pages.get(key)
            if current is not None and current[1] is task:
                del self._pages[key]


def chunks(events: list[Event], previews: bool) -> tuple[list[bytes | memoryview], bool]:
    """The frames of ``events`` up to the first final one, in writes of at most ``CHUNK_BYTES`` (with live
    previews only for a client that asked), and whether one was final."""
    final = False
    for k, event in enumerate(events):
        if event.name in FINAL_STATUSES:
            events, final = events[:k + 1], True
            break
    return list(_pieces(event.frame_for(previews) for event in events)), final


def _pieces(frames) -> Iterator[bytes | memoryview]:
    batch: list[bytes] = []
    size = 0
    for frame in frames:
        if size + len(frame) > CHUNK_BYTES and batch:
            yield batch[0] if len(batch) == 1 else b"".join(batch)
            batch, size = [], 0
        if len(frame) > CHUNK_BYTES:                 # a frame larger than a write: slices of the shared bytes
            view = memoryview(frame)
            for start in range(0, len(frame), CHUNK_BYTES):
                yield view[start:start + CHUNK_BYTES]
            continue
        batch.append(frame)
        size += len(frame)
    if batch:
        yield batch[0] if len(batch) == 1 else b"".join(batch)
