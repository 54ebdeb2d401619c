"""Sampling runs through the real stack (``eqm api`` + ``eqm worker --devices cpu,cpu`` on a real Redis):
``eqm sample --server`` gives the offline run's images exactly, with a worker killed (``kill -9``) every
couple of seconds; a full-stack restart whose Redis lost everything continues from the shards on disk;
a broken download resumes with a range request; the OpenAI Batch API round trip with the official client.
``bench/bench_sampling_runs.py`` runs the large version (10,000 images) and writes the figures."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from service.embedded_redis import free_port
from service.sampling_client import SamplingRunClient
from tests.clientstack import ROOT, service_env, start, stop, wait_ready

pytestmark = pytest.mark.slow

NUM_SAMPLES = 480
# Long enough descents (the former digits defaults: ~47 updates with CFG) that the run outlasts several kills;
# the same settings offline and through the server.
SETTINGS = ["--steps", "60", "--cfg-scale", "1.5", "--grad-norm-threshold", "1.0"]
SETTINGS_BODY = {"max_steps": 60, "guidance_scale": 1.5, "grad_norm_threshold": 1.0}      # the same, as a run's body


class Stack:
    """``eqm api`` and a worker supervisor with two CPU workers, sharing a results store."""

    def __init__(self, redis_url: str, results_dir: Path, log: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = service_env(EQM_REDIS_URL=redis_url, EQM_CHECKPOINT="digits", EQM_RESULTS_DIR=str(results_dir),
                               EQM_HEARTBEAT_S="0.5", EQM_CLAIM_IDLE_MS="1500")
        self.log = log

    def __enter__(self) -> "Stack":
        self.workers = start(["worker", "--devices", "cpu,cpu", "--threads", "1"],
                             self.env, self.log)
        self.api = start(["api", "--port", str(self.port), "--log-level", "warning"], self.env, self.log)
        wait_ready(f"{self.url}/readyz", self.api, self.log)
        return self

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.workers.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        for proc in (self.api, self.workers):
            if proc.poll() is None:
                proc.kill()             # the supervisor's workers die with it (kill -9 included)
                proc.wait()

    def __exit__(self, *exc) -> None:
        stop(self.api)
        stop(self.workers)


def offline(tmp: Path, n: int) -> dict[str, np.ndarray]:
    out = tmp / f"offline-{n}.npz"
    subprocess.run([sys.executable, "-m", "service.cli", "sample", "--checkpoint", "digits", "--num-samples", str(n),
                    "--npz", str(out), "--device", "cpu", *SETTINGS], cwd=ROOT, env=service_env(), check=True,
                   capture_output=True)
    with np.load(out) as z:
        return {"arr_0": z["arr_0"], "arr_1": z["arr_1"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return offline(tmp_path_factory.mktemp("offline"), NUM_SAMPLES)


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("stack")
    with Stack(redis_server.url, tmp / "results", tmp / "stack.log") as s:
        yield s


def test_cli_run_under_kill_9_matches_the_offline_run_image_for_image(stack, reference, tmp_path):
    out, stats = tmp_path / "run.npz", tmp_path / "stats.npz"
    cli = subprocess.Popen([sys.executable, "-m", "service.cli", "sample", "--server", stack.url, "--num-samples",
                            str(NUM_SAMPLES), "--npz", str(out), "--stats-out", str(stats), *SETTINGS], cwd=ROOT,
                           env=service_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kills = 0
    time.sleep(3)
    while cli.poll() is None and kills < 8:           # kill -9 one of the two workers every 2 s
        pids = stack.worker_pids()
        if pids:
            subprocess.run(["kill", "-9", str(random.choice(pids))])
            kills += 1
        time.sleep(2)
    output = cli.communicate(timeout=300)[0]
    assert cli.returncode == 0, output
    assert kills >= 3, "the run finished before the workers could be killed: make it larger"
    with np.load(out) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (NUM_SAMPLES, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(labels, reference["arr_1"])                # uniform: 48 of each class, in order
    assert np.array_equal(images, reference["arr_0"])               # none missing, none twice, all equal
    with np.load(stats) as z:
        assert np.array_equal(z["seeds"], np.arange(NUM_SAMPLES)) and (z["steps"] >= 1).all()
        assert np.isfinite(z["grad_norms"]).all()
    assert f"wrote {out}" in output and f"wrote {stats}" in output


def test_a_broken_download_resumes_with_a_range_request(stack, tmp_path):
    client = SamplingRunClient(stack.url)
    run = client.submit(num_samples=40, shard_size=8, seed=7)
    run = client.wait(run["id"])
    assert run["status"] == "done" and run["progress"]["done"] == 40 and run["progress"]["nfe"] > 0
    whole = httpx.get(run["links"]["npz"])
    assert int(whole.headers["content-length"]) == len(whole.content)
    out = tmp_path / "x.npz"
    (tmp_path / "x.npz.part").write_bytes(whole.content[:1000])
    client.download(run["id"], out)
    assert out.read_bytes() == whole.content and not (tmp_path / "x.npz.part").exists()
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'eqm_sampling_run_shards_total{model="digits",outcome="done"}' in metrics


def test_openai_batch_round_trip_with_the_official_client(stack, tmp_path):
    from openai import OpenAI
    client = OpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    lines = [{"custom_id": f"req-{k}", "method": "POST", "url": "/v1/images/generations",
              "body": {"prompt": str(k % 10), "n": 2, "seed": 100 + k}} for k in range(5)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/images/generations",
                  "body": {"prompt": "zebra", "n": 1}})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations",
                                  completion_window="24h")
    end = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < end:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 1)
    out = [json.loads(t) for t in client.files.content(batch.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{k}" for k in range(5)]
    # The same body through the synchronous route gives the same images.
    sync = client.images.generate(prompt="3", n=2, extra_body={"seed": 103})
    assert [d["b64_json"] for d in out[3]["response"]["body"]["data"]] == [d.b64_json for d in sync.data]
    errors = [json.loads(t) for t in client.files.content(batch.error_file_id).text.splitlines()]
    assert errors[0]["custom_id"] == "bad" and "zebra" in errors[0]["response"]["body"]["error"]["message"]


def test_a_full_stack_restart_that_lost_redis_continues_from_the_shards_on_disk(redis_url, tmp_path, reference):
    results = tmp_path / "results"
    first = Stack(redis_url, results, tmp_path / "stack.log").__enter__()
    client = SamplingRunClient(first.url)
    run = client.submit(num_samples=NUM_SAMPLES, shard_size=16, **SETTINGS_BODY)
    end = time.monotonic() + 120
    while client.status(run["id"])["progress"]["shards_done"] < 3 and time.monotonic() < end:
        time.sleep(0.2)
    first.kill_all()
    before = json.loads((results / "runs" / run["id"] / "run.json").read_text())
    done_before = sum(s["done"] for s in before["shards"])
    assert 0 < done_before < len(before["shards"])
    redis.Redis.from_url(redis_url).flushall()                    # Redis lost every job and record
    with Stack(redis_url, results, tmp_path / "stack2.log", port=first.port) as second:
        client = SamplingRunClient(second.url)
        assert client.status(run["id"])["status"] == "running"
        time.sleep(2)
        waiting = json.loads((results / "runs" / run["id"] / "run.json").read_text())
        assert sum(s["done"] for s in waiting["shards"]) == done_before        # not adopted unasked
        assert client.http.post(f"/v1/sampling-runs/{run['id']}/resume").json()["status"] == "running"
        final = client.wait(run["id"])
        assert final["status"] == "done"
        client.download(run["id"], tmp_path / "run.npz")
    with np.load(tmp_path / "run.npz") as z:
        assert np.array_equal(z["arr_0"], reference["arr_0"]) and np.array_equal(z["arr_1"], reference["arr_1"])
    after = json.loads((results / "runs" / run["id"] / "run.json").read_text())
    kept = [s for s in before["shards"] if s["done"]]
    assert all(after["shards"][s["index"]]["attempts"] == s["attempts"] for s in kept)   # not run again
