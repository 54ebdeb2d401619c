"""Many event streams opening at once on one job: the replay is read once per page for all of them,
each stream writes bounded pieces of the shared frames, and the heap is handed back after a large hold.

In-process (the app under its lifespan, driven through httpx's ASGI transport) against a real Redis;
Redis' own command counters say how many reads the streams made.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.eqm.digits import CLASS_NAMES, digits_config
from models.eqm.network import EqM
from service.api import create_app
from service.api import events as events_module
from service.api.events import EventHub, event_of
from service.api.replays import CHUNK_BYTES, REPLAY_PAGE, chunks
from service.jobstore import ImageSpec, JobSpec, JobStore
from service.settings import Settings

IMAGES = 64


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "digits.safetensors"
    config = digits_config()
    save_safetensors(EqM(config), ModelSpec(config, "all", "identity", CLASS_NAMES), path)
    return str(path)


def wide_finished_job(redis_client, events: int) -> str:
    """A 64-image job with ``events`` progress events (each entry with a few norms) and then ``done``."""
    store = JobStore(redis_client)
    spec = JobSpec(kind="generate", model="digits", images=[ImageSpec(seed=k, labels=[k % 10]) for k in range(IMAGES)])
    store.submit(spec)
    pipe = redis_client.pipeline(transaction=False)
    for step in range(events):
        images = [{"index": k, "steps": step, "grad_norm": 1.5, "norms": [1.51234, 1.50123]} for k in range(IMAGES)]
        store.publish(spec.id, "progress", {"id": spec.id, "time": step, "images": images}, client=pipe)
    store.publish(spec.id, "done", {"id": spec.id}, client=pipe)
    pipe.execute()
    return spec.id


def xread_calls(redis_client) -> int:
    return int(redis_client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def test_streams_opening_at_once_read_each_replay_page_once(redis_url, redis_client, digits_file):
    """100 streams open together on a job whose history is two replay pages: Redis is read twice, not
    200 times, and every stream still gets every event, in order, ending at done."""
    job_id = wide_finished_job(redis_client, REPLAY_PAGE + 100)
    app = create_app(Settings(redis_url=redis_url, checkpoint=digits_file, redis_pool_size=4))

    async def main() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=60) as client:
                return await asyncio.gather(*(client.get(f"/v1/jobs/{job_id}/events") for _ in range(100)))

    redis_client.config_resetstat()
    answers = asyncio.run(main())
    reads = xread_calls(redis_client)
    assert all(a.status_code == 200 for a in answers)
    bodies = {a.content for a in answers}
    assert len(bodies) == 1                                           # the same bytes for every stream
    names = [line[7:] for line in answers[0].text.splitlines() if line.startswith("event: ")]
    assert names == ["queued"] + ["progress"] * (REPLAY_PAGE + 100) + ["done"]
    assert reads <= 4, reads                                          # two pages (and no per-stream reads)


def test_a_stream_writes_pieces_of_at_most_a_chunk():
    """Whatever the events' size, one write of a stream is at most CHUNK_BYTES, and the writes together
    are the frames up to the final event, unchanged."""
    big = json.dumps({"images": [{"index": k, "norms": [1.0] * 600} for k in range(IMAGES)]})
    assert len(big) > 2 * CHUNK_BYTES
    entries = [(f"1-{k}", {b"event": b"progress", b"data": (big if k % 3 == 0 else '{"x": 1}').encode()})
               for k in range(10)]
    entries += [("2-0", {b"event": b"done", b"data": b"{}"}), ("2-1", {b"event": b"progress", b"data": b"{}"})]
    events = [event_of(entry_id, fields) for entry_id, fields in entries]
    pieces, final = chunks(events, previews=False)
    assert final
    assert max(len(p) for p in pieces) <= CHUNK_BYTES
    assert b"".join(bytes(p) for p in pieces) == b"".join(e.frame for e in events[:11])


def test_the_heap_is_handed_back_once_a_large_hold_ends(monkeypatch, redis_url):
    """glibc keeps freed memory: after a hold of at least TRIM_AFTER_FOLLOWERS followers ends, the hub
    trims the heap once (a small hold, or followers still there, do not)."""
    monkeypatch.setattr(events_module, "TRIM_DELAY_S", 0.05)

    async def main() -> tuple[int, int, int]:
        hub = EventHub(redis_url)
        if hub.free_heap._trim is None:
            pytest.skip("this C library has no malloc_trim")
        small = [hub.follow("k", "0") for _ in range(10)]
        for f in small:
            hub.leave(f)
        await asyncio.sleep(0.2)
        after_small = hub.free_heap.trims
        held = [hub.follow(f"k{i % 7}", "0") for i in range(events_module.TRIM_AFTER_FOLLOWERS)]
        for f in held[:-1]:
            hub.leave(f)
        await asyncio.sleep(0.2)
        while_one_left = hub.free_heap.trims
        hub.leave(held[-1])
        await asyncio.sleep(0.3)
        await hub.close()
        return after_small, while_one_left, hub.free_heap.trims

    assert asyncio.run(main()) == (0, 0, 1)
