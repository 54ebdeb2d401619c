"""Worker intake and status reads against a real (private) redis-server, in process."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import redis

from models.codecs import IdentityCodec
from service.engine import Engine
from service.jobstore import ImageSpec, JobSpec, JobStore, SamplerSpec
from service.metrics import Metrics
from service.runner import ModelRunner
from service.worker import Worker, WorkerConfig
from tinymodels import TINY, random_model

CFG = TINY


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


def commands(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (INFO itself not counted)."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_config")}


def test_intake_reads_up_to_free_capacity_and_encodes_off_the_loop(model, redis_url, redis_client, one_torch_thread):
    pool = ThreadPoolExecutor(max_workers=2)
    runner = ModelRunner(model, codec=IdentityCodec(1, 8), null_label=CFG.null_label, guided_channels=1,
                         capacity=6, max_rows=18)
    engine = Engine(runner, model_name="tiny", metrics=Metrics(), encode_pool=pool)
    worker = Worker(WorkerConfig(redis_url=redis_url, capacity=6), engine=engine)
    store = JobStore(redis_client)
    sampler = SamplerSpec(step_size=0.05, mu=0.3, max_steps=4)
    ids = [store.submit(JobSpec(kind="generate", model="tiny", cfg_scale=1.5, sampler=sampler,
                                images=[ImageSpec(seed=j, labels=[j])])) for j in range(8)]
    redis_client.config_resetstat()
    worker._fetch(0)
    # One read took as many jobs as there are free slots (6 of the 8), not one.
    assert commands(redis_client).get("xreadgroup") == 1
    assert len(engine.job_ids()) == 6
    worker._fetch(0)
    assert len(engine.job_ids()) == 7          # no free slot left: a read still takes one job
    encoded_later = 0
    while engine.has_work:
        out = engine.step()
        encoded_later += sum(isinstance(img.data, Future) for img in out.images)
        worker._unwritten.append(out)
        worker._flush_unwritten(wait=not engine.has_work)
    assert encoded_later == 7
    redis_client.config_resetstat()
    rec = store.get(ids[0])
    assert commands(redis_client) == {"hgetall": 1}             # one round trip, no EXISTS per image
    assert rec["status"] == "done" and rec["ready"] == [True]
    assert store.image(ids[0], 0)[:4] == b"\x89PNG"
    assert store.get(ids[7])["ready"] == [False]                 # still queued
    pool.shutdown()


def test_worker_with_the_device_lag_gives_the_same_images_and_honours_a_cancel(model, redis_url, redis_client,
                                                                              one_torch_thread):
    """The CUDA defaults on the CPU: status read and image emission one step late. A worker running that
    way stores byte-identical images to an engine without the lag, and a cancel still stops a running job."""
    sampler = lambda steps, threshold=0.0: SamplerSpec(step_size=0.05, mu=0.3, max_steps=steps,   # noqa: E731
                                                       grad_norm_threshold=threshold)
    specs = [JobSpec(kind="generate", model="tiny", cfg_scale=1.5, sampler=sampler(steps, threshold),
                     images=[ImageSpec(seed=10 * j + i, labels=[j]) for i in range(n)])
             for j, (steps, threshold, n) in enumerate([(6, 0.0, 2), (12, 1e9, 1), (9, 0.0, 3), (15, 0.0, 1)])]
    long_job = JobSpec(kind="generate", model="tiny", cfg_scale=1.5, sampler=sampler(100_000),
                       images=[ImageSpec(seed=99, labels=[4])])

    reference = Engine(ModelRunner(model, codec=IdentityCodec(1, 8), null_label=CFG.null_label, guided_channels=1,
                                   capacity=6, max_rows=18, status_lag=0), model_name="tiny", metrics=Metrics())
    for spec in specs:
        reference.add_job(JobSpec(**spec.__dict__))
    expected = {(img.job_id, img.result.index): img.data for out in reference.run_until_idle() for img in out.images}

    runner = ModelRunner(model, codec=IdentityCodec(1, 8), null_label=CFG.null_label, guided_channels=1,
                         capacity=6, max_rows=18, status_lag=1)
    assert runner.emit_lag == 1
    worker = Worker(WorkerConfig(redis_url=redis_url, capacity=6, heartbeat_s=0.2),
                    engine=Engine(runner, model_name="tiny", metrics=Metrics()))
    store = JobStore(redis_client)
    store.submit(long_job)
    for spec in specs:
        store.submit(spec)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(store.get(s.id)["status"] == "done" for s in specs):
            time.sleep(0.05)
        assert store.get(long_job.id)["status"] == "running"
        store.cancel(long_job.id)
        while time.monotonic() < deadline and store.get(long_job.id)["status"] != "cancelled":
            time.sleep(0.05)
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    for spec in specs:
        assert store.get(spec.id)["status"] == "done"
        for i in range(len(spec.images)):
            assert store.image(spec.id, i) == expected[(spec.id, i)]
    assert store.get(long_job.id)["status"] == "cancelled"


def test_a_worker_reads_and_reclaims_only_its_models_stream(model, redis_url, redis_client, one_torch_thread):
    """Each model has its own stream: a worker of ``tiny`` neither reads nor reclaims ``other``'s jobs, and a
    dead ``tiny`` worker's job goes to a live ``tiny`` worker."""
    def make_worker(name: str) -> Worker:
        runner = ModelRunner(model, codec=IdentityCodec(1, 8), null_label=CFG.null_label, guided_channels=1,
                             capacity=4, max_rows=12)
        engine = Engine(runner, model_name="tiny", metrics=Metrics(), encode_pool=ThreadPoolExecutor(1))
        return Worker(WorkerConfig(redis_url=redis_url, capacity=4, claim_idle_ms=1, name=name), engine=engine)

    store = JobStore(redis_client)
    sampler = SamplerSpec(step_size=0.05, mu=0.3, max_steps=4)
    other = store.enqueue(JobSpec(kind="generate", model="other", sampler=sampler, images=[ImageSpec(seed=1)]))
    mine = store.enqueue(JobSpec(kind="generate", model="tiny", sampler=sampler, images=[ImageSpec(seed=2)]))
    assert store.queue_depth("other") == 1 and store.queue_depth("tiny") == 1
    # A worker of "other" read its job and died holding it (pending, idle): no worker of tiny takes it.
    k = store.keys
    redis_client.xreadgroup(k.group, "dead-other", {k.stream_for("other"): ">"}, count=1)
    dead_tiny = make_worker("dead-tiny")
    dead_tiny._fetch(0)
    assert dead_tiny.engine.job_ids() == [mine]
    time.sleep(0.01)
    live = make_worker("live-tiny")
    live._fetch(0)
    assert live.engine.job_ids() == []                    # nothing new on tiny's stream; other's is not read
    assert live._reclaim() == 1 and live.engine.job_ids() == [mine]      # the dead tiny worker's job, only
    assert redis_client.xpending(k.stream_for("other"), k.group)["consumers"] == [
        {"name": b"dead-other", "pending": 1}]
    assert store.get(other)["status"] == "queued" and store.get(other)["worker"] is None
