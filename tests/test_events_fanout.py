"""The shared event reader's fan-out, against a real Redis: each entry framed once for all its
followers, the same bytes for each, every entry in order (a slow follower gets them all at once),
and waits released when the server stops."""
from __future__ import annotations

import asyncio
import json

import redis.asyncio as aredis

from service.api.events import EventHub, sse_frame

KEY = "eqm:job:fanout:events"


async def _add(client, n: int, final: bool = True) -> list[str]:
    ids = []
    for k in range(n):
        name = "done" if final and k == n - 1 else "progress"
        entry_id = await client.xadd(KEY, {"event": name, "data": json.dumps({"k": k, "norms": [0.5] * k})})
        ids.append(entry_id.decode())
    return ids


async def _follow_to_done(follower) -> list:
    got = []
    while not got or got[-1].name != "done":
        events = await follower.drain(10)
        assert events, "no event within 10 s"
        got += events
    return got


def test_each_entry_is_framed_once_and_shared_by_every_follower(redis_url):
    async def scenario():
        hub, client = EventHub(redis_url), aredis.Redis.from_url(redis_url)
        hub.start()
        try:
            followers = [hub.follow(KEY, "0") for _ in range(200)]
            readers = [asyncio.create_task(_follow_to_done(f)) for f in followers]
            await asyncio.sleep(0.1)
            ids = await _add(client, 30)
            got = await asyncio.wait_for(asyncio.gather(*readers), 20)
            stored = await client.xrange(KEY)
            return hub.frames_encoded, ids, got, stored
        finally:
            await client.aclose()
            await hub.close()

    encoded, ids, got, stored = asyncio.run(scenario())
    assert encoded == len(ids) == 30                     # 30 entries, 200 followers: 30 encodings
    expected = [sse_frame(i, f[b"event"], f[b"data"]) for i, f in stored]
    for events in got:
        assert [e.id for e in events] == ids             # every entry, in order
        assert [e.frame for e in events] == expected
        assert all(a.frame is b.frame for a, b in zip(events, got[0]))    # the very same bytes objects
    assert expected[0].startswith(f"id: {ids[0]}\nevent: progress\ndata: ".encode()) and expected[0].endswith(b"\n\n")


def test_a_follower_that_fell_behind_gets_every_entry_in_one_drain(redis_url):
    async def scenario():
        hub, client = EventHub(redis_url), aredis.Redis.from_url(redis_url)
        hub.start()
        try:
            ids = await _add(client, 3, final=False)
            late = hub.follow(KEY, ids[0])               # resumes after the first entry (Last-Event-ID)
            prompt = hub.follow(KEY, ids[-1])
            more = await _add(client, 12)
            prompt_got = await _follow_to_done(prompt)   # drains as entries come
            await asyncio.sleep(0.2)
            late_got = await late.drain(5)               # never drained meanwhile: everything at once
            return ids, more, prompt_got, late_got
        finally:
            await client.aclose()
            await hub.close()

    ids, more, prompt_got, late_got = asyncio.run(scenario())
    assert [e.id for e in prompt_got] == more
    assert [e.id for e in late_got] == ids[1:] + more    # nothing skipped, nothing repeated


def test_waits_return_at_once_when_the_server_stops(redis_url):
    async def scenario():
        hub, stopping = EventHub(redis_url), asyncio.Event()
        hub.start(stopping)
        try:
            follower = hub.follow(KEY, "0")
            waiting = asyncio.create_task(follower.drain(60))
            await asyncio.sleep(0.1)
            loop = asyncio.get_running_loop()
            t = loop.time()
            stopping.set()
            events = await asyncio.wait_for(waiting, 5)
            late = hub.follow(KEY, "0")                  # followed after the stop: never waits
            return events, loop.time() - t, await asyncio.wait_for(late.drain(60), 5)
        finally:
            await hub.close()

    events, waited, late_events = asyncio.run(scenario())
    assert events == [] and late_events == [] and waited < 1.0


def test_a_shutdown_step_that_never_returns_is_bounded(caplog):
    """Closing a Redis connection can wait on a socket that never reports closed: the API's shutdown goes on
    past such a step (logged) instead of hanging with its port and streams held."""
    import asyncio
    import time

    from service.api.deps import bounded

    async def never() -> None:
        await asyncio.Event().wait()

    async def main() -> float:
        t0 = time.monotonic()
        await bounded(never(), "a stuck connection", timeout_s=0.2)
        return time.monotonic() - t0

    with caplog.at_level("WARNING", logger="eqm.api"):
        took = asyncio.run(main())
    assert 0.2 <= took < 2.0
    assert "closing a stuck connection took over" in caplog.text
