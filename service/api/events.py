"""One shared reader for every event stream and ``?wait=true`` of an API process.

A follower (an SSE stream, a wait) used to hold a pooled Redis connection in ``XREAD BLOCK`` for its
whole life, so about a hundred of them exhausted the pool and the rest were answered 503. Here one
task reads every followed job's event stream with a single ``XREAD BLOCK`` over all their keys, on
one dedicated connection, and hands each new entry to the followers of that key (an asyncio queue
each). Open streams then cost memory (a queue, a few hundred bytes), not connections: thousands per
process.

- A follower first replays what it missed with a plain (non-blocking) ``XREAD`` on the pooled client,
  then registers with the id of the last entry it saw; the reader delivers entries after that id.
- A key followed for the first time wakes the reader (``CLIENT UNBLOCK`` of its connection) so the
  new key joins the read at once; wake-ups are coalesced, at most one per ``WAKE_INTERVAL_S``.
- Redis going away does not end the streams: the reader retries with back-off and resumes after the
  last id of each key, so followers see every entry once Redis is back.

Fan-out: an entry is turned into its server-sent-event bytes once, by the reader, and every follower
of its key gets that same ``bytes`` object (nothing is decoded or formatted per follower). Handing an
entry to a follower is an append to its list and, if it is waiting, one future resolved: no task per
wait. Followers are woken ``WAKE_BATCH`` at a time with a turn of the event loop in between, so a
thousand streams on one hot job do not hold the loop for a whole fan-out while other requests wait.
A follower that fell behind takes everything it has pending at once (``drain``): one write, every
entry in order, none dropped.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import redis
import redis.asyncio as aredis

log = logging.getLogger("eqm.api.events")

BLOCK_MS = 5000              # longest single XREAD BLOCK of the reader
WAKE_INTERVAL_S = 0.02       # at most one wake-up of the reader this often
READ_COUNT = 100             # entries per key per read
WAKE_BATCH = 16              # followers handed an entry per turn of the event loop
CLOSE_STEP_S = 2.0          # longest wait for one part of the hub to close (a socket may never report closed)
TRIM_AFTER_FOLLOWERS = 100   # the freed heap is handed back once a hold at least this large has ended
TRIM_DELAY_S = 3.0           # ... this long after its last follower left (shared replay pages expire first)


@dataclass(frozen=True)
class Event:
    """One entry of a job's event stream: its id, its name and its server-sent-event bytes.

    ``frame`` is the entry as stored; ``plain_frame`` the same without live previews (a ``progress``
    entry carries them only while some client asked), made once per entry on first use and shared by
    every follower that did not ask."""

    id: str
    name: str
    frame: bytes
    _plain: list = field(default_factory=list, compare=False, repr=False)

    @property
    def plain_frame(self) -> bytes:
        if self.name != "progress" or b'"preview"' not in self.frame:
            return self.frame
        if not self._plain:
            data = self.frame.split(b"\ndata: ", 1)[1].rstrip(b"\n")
            body = json.loads(data)
            for image in body.get("images", []):
                image.pop("preview", None)
            self._plain.append(sse_frame(self.id, self.name, json.dumps(body)))
        return self._plain[0]

    def frame_for(self, previews: bool) -> bytes:
        return self.frame if previews else self.plain_frame


def sse_frame(entry_id: bytes | str, event: bytes | str, data: bytes | str) -> bytes:
    """``id: ...\nevent: ...\ndata: ...\n\n`` (``data`` is one line of JSON)."""
    as_bytes = lambda v: v.encode() if isinstance(v, str) else v    # noqa: E731
    return b"id: %b\nevent: %b\ndata: %b\n\n" % (as_bytes(entry_id), as_bytes(event), as_bytes(data))


def event_of(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
    """An entry as Redis returns it (``event`` and ``data`` fields), framed once."""
    entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    name = fields.get(b"event", b"")
    return Event(entry_id, name.decode(), sse_frame(entry_id, name, fields.get(b"data", b"")))


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Follower:
    """One follower of one key: the events after ``last``, in order, wait in ``pending``."""

    key: str
    last: str
    pending: list[Event] = field(default_factory=list)
    released: bool = False                   # the server stops: every wait returns at once
    _waiter: asyncio.Future | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout_s: float) -> None:
        """Until an event is pending, ``timeout_s`` passed or the follower is released (one future, one timer)."""
        if self.pending or self.released:
            return
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, self._wake)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def drain(self, timeout_s: float) -> list[Event]:
        """Every pending event, in order (waiting up to ``timeout_s`` for one); [] after the timeout or once
        released."""
        await self._wait(timeout_s)
        events, self.pending = self.pending, []
        return events

    async def next(self, timeout_s: float) -> Event | None:
        """The next event, or None after ``timeout_s`` without one."""
        await self._wait(timeout_s)
        return self.pending.pop(0) if self.pending else None


class FreeHeap:
    """Hands freed heap back to the system (glibc ``malloc_trim``) once a large hold has ended: glibc
    otherwise keeps what a thousand streams' buffers used, and the process stays at its high-water
    mark. A no-op where the C library has no ``malloc_trim``."""

    def __init__(self, followers: Callable[[], int]):
        self._followers = followers    # how many followers there are now
        path = ctypes.util.find_library("c")
        try:
            self._trim = ctypes.CDLL(path).malloc_trim if path else None
        except (OSError, AttributeError):
            self._trim = None
        self.peak = 0                  # most followers at once since the last trim
        self.trims = 0

    def changed(self) -> None:
        """A follower came or went."""
        followers = self._followers()
        self.peak = max(self.peak, followers)
        if followers == 0 and self.peak >= TRIM_AFTER_FOLLOWERS and self._trim is not None:
            self.peak = 0
            loop = asyncio.get_running_loop()
            loop.call_later(TRIM_DELAY_S, self._trim_if_idle, loop)

    def _trim_if_idle(self, loop) -> None:
        if self._followers() == 0:         # in a thread: it walks the whole heap
            self.trims += 1
            loop.run_in_executor(None, self._trim, 0)


class EventHub:
    """The shared reader. ``start()`` in the app's lifespan, ``follow``/``leave`` per follower, ``close()``."""

    def __init__(self, redis_url: str):
        # One connection, never shared: its client id is what CLIENT UNBLOCK targets.
        self._reader = aredis.Redis.from_url(redis_url, single_connection_client=True, socket_connect_timeout=2,
                                             socket_timeout=BLOCK_MS / 1000 + 10)
        self._waker = aredis.Redis.from_url(redis_url, single_connection_client=True, socket_connect_timeout=2,
                                            socket_timeout=5)
        self._followers: dict[str, dict[Follower, None]] = {}    # insertion-ordered sets
        self._cursor: dict[str, str] = {}            # key -> last id the reader has seen for it
        self._changed = asyncio.Event()
        self._reader_id: int | None = None
        self._reading = False
        self._wake_pending = False
        self._task: asyncio.Task | None = None
        self._stop_task: asyncio.Task | None = None
        self.frames_encoded = 0                      # entries framed by the reader (once each, whatever the followers)
        self._count = 0                              # followers now
        self.free_heap = FreeHeap(lambda: self._count)

    @property
    def followers(self) -> int:
        return self._count

    def start(self, stopping: asyncio.Event | None = None) -> None:
        """Start reading; once ``stopping`` is set, every follower's wait returns at once."""
        self._task = asyncio.create_task(self._run(), name="eqm-event-hub")
        if stopping is not None:
            self._stop_task = asyncio.create_task(self._release_on(stopping), name="eqm-event-hub-stop")

    async def _release_on(self, stopping: asyncio.Event) -> None:
        await stopping.wait()
        for group in self._followers.values():
            for follower in group:
                follower.released = True
                follower._wake()

    async def close(self) -> None:
        for task in (self._task, self._stop_task):
            if task is None:
                continue
            task.cancel()
            try:
                await asyncio.wait_for(task, CLOSE_STEP_S)
            except (asyncio.CancelledError, asyncio.TimeoutError, Exception):
                pass
        for client in (self._reader, self._waker):
            try:
                await asyncio.wait_for(client.aclose(), CLOSE_STEP_S)
            except Exception:           # closing a connection that already broke, or one that never says closed
                pass

    def follow(self, key: str, last: str) -> Follower:
        """Register a follower of ``key`` that has seen everything up to ``last``."""
        follower = Follower(key, last)
        follower.released = self._stop_task is not None and self._stop_task.done()
        group = self._followers.setdefault(key, {})
        group[follower] = None
        self._count += 1
        self.free_heap.changed()
        cursor = self._cursor.get(key)
        if cursor is None or _id(last) < _id(cursor):
            self._cursor[key] = last
            self._wake()
        return follower

    def leave(self, follower: Follower) -> None:
        group = self._followers.get(follower.key)
        if group is None or follower not in group:
            return
        group.pop(follower)
        follower.released = True
        self._count -= 1
        self.free_heap.changed()
        if not group:
            del self._followers[follower.key]
            self._cursor.pop(follower.key, None)

    # -- the reader ------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._changed.set()
        if self._reading and not self._wake_pending and self._reader_id is not None:
            self._wake_pending = True
            asyncio.get_running_loop().call_later(WAKE_INTERVAL_S, self._send_wake)

    def _send_wake(self) -> None:
        asyncio.ensure_future(self._unblock())

    async def _unblock(self) -> None:
        """Interrupt the reader's XREAD; retried while it has not started blocking yet (CLIENT UNBLOCK
        answers 0 then). Done once a read started after the change (it clears ``_changed``)."""
        try:
            for _ in range(50):
                if not (self._reading and self._changed.is_set() and self._reader_id is not None):
                    return
                if await self._waker.client_unblock(self._reader_id):
                    return
                await asyncio.sleep(0.01)
        except redis.RedisError as exc:
            log.debug("could not wake the event reader: %s", exc)
        finally:
            self._wake_pending = False

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                if not self._followers:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                self._reading = True
                streams = dict(self._cursor)
                self._changed.clear()
                try:
                    reply = await self._reader.xread(streams, block=BLOCK_MS, count=READ_COUNT)
                finally:
                    self._reading = False
                await self._deliver(reply or [])
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except redis.RedisError as exc:
                self._reader_id = None          # a new connection gets a new client id
                backoff = min(5.0, max(0.2, 2 * backoff))
                log.warning("event reader: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)

    async def _deliver(self, reply) -> None:
        """Frame each new entry once and hand the same bytes to every follower of its key, ``WAKE_BATCH``
        followers per turn of the loop (a follower that leaves meanwhile is skipped)."""
        handed = 0
        for key, entries in reply:
            key = key.decode() if isinstance(key, bytes) else key
            group = self._followers.get(key)
            if not group or not entries:
                continue
            self._cursor[key] = entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
            events = [event_of(entry_id, fields) for entry_id, fields in entries]
            self.frames_encoded += len(events)
            ats = [_id(event.id) for event in events]
            for follower in list(group):
                if follower.released:
                    continue
                seen = _id(follower.last)
                new = events if seen < ats[0] else [e for e, at in zip(events, ats) if at > seen]
                if new:
                    follower.pending += new
                    follower.last = new[-1].id
                    follower._wake()
                handed += 1
                if handed % WAKE_BATCH == 0:
                    await asyncio.sleep(0)       # let other requests run between slices of the fan-out
