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
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis

log = logging.getLogger("eqm.api.events")

BLOCK_MS = 5000              # longest single XREAD BLOCK of the reader
WAKE_INTERVAL_S = 0.02       # at most one wake-up of the reader this often
READ_COUNT = 100             # entries per key per read

Entry = tuple[str, dict[bytes, bytes]]        # (entry id, fields)


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Follower:
    """One follower of one key: entries after ``last`` arrive in ``queue``."""

    key: str
    last: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def next(self, timeout_s: float) -> Entry | None:
        """The next entry, or None after ``timeout_s`` without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None


class EventHub:
    """The shared reader. ``start()`` in the app's lifespan, ``follow``/``leave`` per follower, ``close()``."""

    def __init__(self, redis_url: str):
        # One connection, never shared: its client id is what CLIENT UNBLOCK targets.
        self._reader = aredis.Redis.from_url(redis_url, single_connection_client=True, socket_connect_timeout=2,
                                             socket_timeout=BLOCK_MS / 1000 + 10)
        self._waker = aredis.Redis.from_url(redis_url, single_connection_client=True, socket_connect_timeout=2,
                                            socket_timeout=5)
        self._followers: dict[str, set[Follower]] = {}
        self._cursor: dict[str, str] = {}            # key -> last id the reader has seen for it
        self._changed = asyncio.Event()
        self._reader_id: int | None = None
        self._reading = False
        self._wake_pending = False
        self._task: asyncio.Task | None = None

    @property
    def followers(self) -> int:
        return sum(len(f) for f in self._followers.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="eqm-event-hub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for client in (self._reader, self._waker):
            try:
                await client.aclose()
            except Exception:           # closing a connection that already broke
                pass

    def follow(self, key: str, last: str) -> Follower:
        """Register a follower of ``key`` that has seen everything up to ``last``."""
        follower = Follower(key, last)
        group = self._followers.setdefault(key, set())
        group.add(follower)
        cursor = self._cursor.get(key)
        if cursor is None or _id(last) < _id(cursor):
            self._cursor[key] = last
            self._wake()
        return follower

    def leave(self, follower: Follower) -> None:
        group = self._followers.get(follower.key)
        if group is None:
            return
        group.discard(follower)
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
                self._deliver(reply or [])
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except redis.RedisError as exc:
                self._reader_id = None          # a new connection gets a new client id
                backoff = min(5.0, max(0.2, 2 * backoff))
                log.warning("event reader: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)

    def _deliver(self, reply) -> None:
        for key, entries in reply:
            key = key.decode() if isinstance(key, bytes) else key
            group = self._followers.get(key)
            if not group or not entries:
                continue
            for entry_id, fields in entries:
                entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                at = _id(entry_id)
                for follower in group:
                    if at > _id(follower.last):
                        follower.last = entry_id
                        follower.queue.put_nowait((entry_id, fields))
            self._cursor[key] = entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
