"""Sampling runs without a worker: the plan (labels, shards), the results store (write once, checksums,
streamed assembly into the ADM layout), the keeper's bookkeeping against a real Redis, and the one-line
refusals at submission (labels, limits, free space, an unwritable store)."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from service.jobstore import JobStore, SamplerSpec
from service.runs import store as results
from service.runs.keeper import RunKeeper, progress
from service.runs.plan import PlanError, new_run, run_labels, shard_bounds, shard_job, uniform_labels
from tests.test_api import digits_file, heartbeat, make_client  # noqa: F401  (fixtures)


# -- plan -----------------------------------------------------------------------------------------
def test_uniform_labels_follow_the_adm_convention():
    assert uniform_labels(20, 10) == [y for y in range(10) for _ in range(2)]
    uneven = uniform_labels(23, 10)
    assert [uneven.count(y) for y in range(10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert uneven == sorted(uneven)
    assert uniform_labels(3, 0) == [-1, -1, -1]


def test_explicit_labels_are_checked_against_the_run():
    assert run_labels([1, 2, 3], 3, 10) == [1, 2, 3]
    with pytest.raises(PlanError, match="lists 2 labels for num_samples=3"):
        run_labels([1, 2], 3, 10)
    with pytest.raises(PlanError, match=r"labels\[1\] = 12 is not a class"):
        run_labels([1, 12, 3], 3, 10)
    with pytest.raises(PlanError, match="unconditional"):
        run_labels([0], 1, 0)


def test_shards_cover_every_image_once_with_the_runs_seeds():
    assert shard_bounds(70, 32) == [(0, 32), (32, 32), (64, 6)]
    record = _record(70, 32, seed=1000)
    specs = [shard_job(record, s) for s in record["shards"]]
    seeds = [img.seed for spec in specs for img in spec.images]
    assert seeds == list(range(1000, 1070))
    assert [img.labels[0] for spec in specs for img in spec.images] == uniform_labels(70, 10)
    assert all(spec.priority == -1 and spec.results.endswith(f"{k:05d}.npz") for k, spec in enumerate(specs))
    assert len({spec.id for spec in specs}) == 3


def _record(n: int, shard: int, seed: int = 0) -> dict:
    return new_run(model="digits", labels=uniform_labels(n, 10), seed=seed, cfg_scale=1.0, sampler=SamplerSpec(),
                   shard_size=shard, priority=-1, image_size=(8, 8), channels=1)


def _shard_arrays(start: int, count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(start)
    return {"images": rng.integers(0, 256, (count, 8, 8, 1), dtype=np.uint8),
            "labels": np.arange(start, start + count) % 10, "seeds": np.arange(start, start + count),
            "steps": np.full(count, 7, np.int32), "grad_norms": np.ones(count, np.float32),
            "energies": np.full(count, np.nan, np.float32)}


# -- store ----------------------------------------------------------------------------------------
def test_a_shard_is_written_once_and_a_damaged_one_is_removed(tmp_path):
    path = tmp_path / "runs" / "r" / "shards" / "00000.npz"
    first = _shard_arrays(0, 4)
    assert results.write_shard(path, first)
    assert not results.write_shard(path, _shard_arrays(99, 4))          # a second delivery writes nothing
    assert np.array_equal(results.read_shard(path)["images"], first["images"])
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    assert results.read_shard(path) is None
    assert not path.exists() and not results.shard_done(path)
    assert not list(path.parent.glob(".*.tmp"))


def test_assembly_streams_shards_into_the_adm_layout(tmp_path):
    record = _record(70, 32)
    parts = [_shard_arrays(s["start"], s["count"]) for s in record["shards"]]
    for shard, arrays in zip(record["shards"], parts):
        results.write_shard(results.shard_path(tmp_path, record["id"], shard["index"]), arrays)
    samples, stats = results.assemble(tmp_path, record)
    with np.load(samples) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        want = np.concatenate([p["images"] for p in parts])
        assert z["arr_0"].shape == (70, 8, 8, 3) and z["arr_0"].dtype == np.uint8
        assert all(np.array_equal(z["arr_0"][..., c], want[..., 0]) for c in range(3))
        assert np.array_equal(z["arr_1"], np.arange(70) % 10)
    with np.load(stats) as z:
        assert np.array_equal(z["seeds"], np.arange(70)) and z["steps"].tolist() == [7] * 70
    assert zipfile.ZipFile(samples).testzip() is None


def test_assembly_refuses_a_missing_shard_and_leaves_no_file(tmp_path):
    record = _record(40, 32)
    results.write_shard(results.shard_path(tmp_path, record["id"], 0), _shard_arrays(0, 32))
    with pytest.raises(results.StoreError, match="shard 1 .* missing"):
        results.assemble(tmp_path, record)
    assert not (results.run_dir(tmp_path, record["id"]) / results.SAMPLES_FILE).exists()
    assert not list(results.run_dir(tmp_path, record["id"]).glob(".*"))


# -- keeper bookkeeping (real Redis, no worker) ----------------------------------------------------
def test_keeper_keeps_a_window_and_resubmits_what_redis_lost(tmp_path, redis_client):
    store = JobStore(redis_client)
    keeper = RunKeeper(tmp_path, store, window=2)
    record = _record(100, 16)                                  # 7 shards
    keeper.submit(record)
    saved = results.load_run(tmp_path, record["id"])
    queued = [s["job"] for s in saved["shards"] if s["job"]]
    assert len(queued) == 2 and store.queue_depth() == 2
    # Shard 0 arrives; Redis then loses everything (a restart without persistence).
    results.write_shard(results.shard_path(tmp_path, record["id"], 0), _shard_arrays(0, 16))
    redis_client.flushall()
    keeper.tick()                                              # not adopted: this Redis no longer knows the run
    assert results.load_run(tmp_path, record["id"])["shards"][0]["done"] is False
    keeper.resume(record["id"])
    saved = results.load_run(tmp_path, record["id"])
    assert saved["shards"][0]["done"] and saved["shards"][0]["nfe"] == 16 * 7
    jobs = [s for s in saved["shards"] if s["job"] and not s["done"]]
    assert [s["index"] for s in jobs] == [1, 2] and jobs[0]["attempts"] == 2      # shard 1 again, shard 2 new
    assert all(store.get(s["job"])["status"] == "queued" for s in jobs)
    p = progress(saved)
    assert (p["done"], p["total"], p["shards_done"], p["shards_total"]) == (16, 100, 1, 7)
    keeper.cancel(record["id"])
    assert all(store.get(s["job"])["status"] == "cancelled" for s in jobs)
    assert results.load_run(tmp_path, record["id"])["status"] == "cancelled"


def test_a_shard_that_keeps_failing_fails_the_run_with_the_reason(tmp_path, redis_client):
    store = JobStore(redis_client)
    keeper = RunKeeper(tmp_path, store, window=1)
    record = _record(16, 16)
    keeper.submit(record)
    for _ in range(3):
        job = results.load_run(tmp_path, record["id"])["shards"][0]["job"]
        store.finish(job, "failed", error="the device fell over")
        keeper.tick()
    saved = results.load_run(tmp_path, record["id"])
    assert saved["status"] == "failed" and "shard 0 failed 3 times" in saved["error"]
    assert "the device fell over" in saved["error"]
    assert progress(saved)["shards_failed"] == 3


# -- submission errors ------------------------------------------------------------------------------
@pytest.fixture
def runs_client(make_client, redis_client, tmp_path):
    heartbeat(redis_client)
    return make_client(results_dir=str(tmp_path / "results"), max_run_samples=1000)


@pytest.mark.parametrize("body, status, message", [
    ({"num_samples": 3, "labels": [1, 2]}, 422, "labels lists 2 labels for num_samples=3"),
    ({"num_samples": 2, "labels": [1, "zebra"]}, 422, "zebra"),
    ({"num_samples": 5000}, 422, "more than this server's limit of 1000 per run"),
    ({"num_samples": 10, "shard_size": 500}, 422, "shard_size=500 is more than 64"),
    ({"num_samples": 10, "model": "other"}, 404, "unknown model 'other'"),
])
def test_bad_runs_get_one_line_and_write_nothing(runs_client, tmp_path, body, status, message):
    resp = runs_client.post("/v1/sampling-runs", json=body)
    assert resp.status_code == status, resp.text
    text = json.dumps(resp.json())
    assert message in text
    assert results.run_ids(tmp_path / "results") == []


def test_a_run_larger_than_the_free_space_is_507(make_client, redis_client, tmp_path):
    heartbeat(redis_client)
    client = make_client(results_dir=str(tmp_path), max_run_samples=10**13)
    resp = client.post("/v1/sampling-runs", json={"num_samples": 10**13})
    assert resp.status_code == 507
    assert "GB in the results store" in resp.json()["detail"] and "\n" not in resp.json()["detail"]
    assert results.run_ids(tmp_path) == []


def test_an_unwritable_results_dir_is_refused_at_submission(make_client, redis_client, tmp_path):
    heartbeat(redis_client)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    client = make_client(results_dir=str(blocker / "results"))
    resp = client.post("/v1/sampling-runs", json={"num_samples": 10})
    assert resp.status_code == 503
    assert "is not writable" in resp.json()["detail"] and "EQM_RESULTS_DIR" in resp.json()["detail"]


def test_a_run_is_queued_as_low_priority_shards_and_can_be_cancelled(runs_client, redis_client):
    resp = runs_client.post("/v1/sampling-runs", json={"num_samples": 100, "shard_size": 10, "seed": 5})
    assert resp.status_code == 202, resp.text
    run = resp.json()
    assert run["progress"]["shards_total"] == 10 and run["label_counts"] == {str(y): 10 for y in range(10)}
    store = JobStore(redis_client)
    assert store.queue_depth() == 2                      # two shards per live worker, not the whole run
    first = store.get(f"{run['id']}s00000a1")
    assert first["spec"]["priority"] == -1 and [i["seed"] for i in first["spec"]["images"]] == list(range(5, 15))
    assert runs_client.get(run["links"]["npz"]).status_code == 409
    cancelled = runs_client.post(f"/v1/sampling-runs/{run['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and store.queue_depth() == 0
    assert runs_client.get("/v1/sampling-runs/nosuchrun").status_code == 404


def test_shards_dead_lettered_by_dying_workers_run_again_without_failing_the_run(tmp_path, redis_client):
    store = JobStore(redis_client)
    keeper = RunKeeper(tmp_path, store, window=1)
    record = _record(16, 16)
    keeper.submit(record)
    for _ in range(5):
        job = results.load_run(tmp_path, record["id"])["shards"][0]["job"]
        store.finish(job, "failed", error="dead-lettered: the worker running it stopped or crashed 3 times (limit 3)")
        keeper.tick()
    saved = results.load_run(tmp_path, record["id"])
    assert saved["status"] == "running" and saved["shards"][0]["attempts"] == 6
    assert store.get(saved["shards"][0]["job"])["status"] == "queued"
    assert (progress(saved)["shards_lost"], progress(saved)["shards_failed"]) == (5, 0)


def test_a_digits_runs_report_gives_what_eqm_eval_gives_on_its_npz(tmp_path, capsys):
    """The run's report is the quality judge's verdict on the assembled .npz: the same figures `eqm eval
    --images` prints for that file (labels read from arr_1), beside the ADM evaluator's command."""
    import json

    from service.cli import main
    from service.runs.report import evaluate
    record = _record(40, 32)
    for shard in record["shards"]:
        results.write_shard(results.shard_path(tmp_path, record["id"], shard["index"]),
                            _shard_arrays(shard["start"], shard["count"]))
    samples, _ = results.assemble(tmp_path, record)
    report = evaluate(samples, record)
    assert "evaluator.py" in report["adm_evaluator"]
    judged = report["judge"]
    assert judged["count"] == judged["judged_images"] == 40
    assert main(["eval", "--images", str(samples), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["samples"]
    assert {k: judged[k] for k in cli} == cli and cli["accuracy"] is not None


def test_events_end_with_the_final_status_and_a_cancelled_run_resumes(runs_client, redis_client):
    run = runs_client.post("/v1/sampling-runs", json={"num_samples": 30, "shard_size": 10}).json()
    runs_client.post(f"/v1/sampling-runs/{run['id']}/cancel")
    with runs_client.stream("GET", run["links"]["events"]) as resp:
        text = "".join(resp.iter_text())
    assert text.startswith("event: progress\ndata: ") and '"total": 30' in text
    assert "event: cancelled\n" in text and text.rstrip().endswith("}")
    resumed = runs_client.post(f"/v1/sampling-runs/{run['id']}/resume").json()
    assert resumed["status"] == "running"
    assert JobStore(redis_client).queue_depth() == 2                    # the window, queued again
