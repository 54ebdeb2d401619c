"""Many models behind one API: the request picks the model; each model has its own queue (in-process API,
real Redis, workers simulated by their heartbeats as in ``test_api``)."""
from __future__ import annotations

import io
import json
import time

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.eqm.network import EqM, EqMConfig
from service.api import create_app
from service.jobstore import JobStore
from service.settings import Settings

BUNDLED = ("digits", "digits-e", "em-digits")


@pytest.fixture(scope="module")
def latent_file(tmp_path_factory):
    """A tiny 1000-class latent model (32 px images through the SD-VAE codec; random weights)."""
    path = tmp_path_factory.mktemp("models") / "tiny-in1k.safetensors"
    config = EqMConfig(arch="custom", input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                       num_heads=2, num_classes=1000)
    save_safetensors(EqM(config), ModelSpec(config, "official", "sd-vae"), path)
    return str(path)


@pytest.fixture
def client(redis_url, latent_file):
    settings = Settings(redis_url=redis_url, checkpoints=(*BUNDLED, latent_file), max_queue=2, wait_timeout_s=0.5)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def store(redis_client):
    return JobStore(redis_client)


def beat(r: redis.Redis, *models: str, name: str = "w1") -> None:
    """A live worker serving ``models`` (what its heartbeat writes)."""
    r.hset("eqm:workers", name, json.dumps({"device": "cpu", "model": models[0], "models": list(models),
                                            "seen": time.time()}))


@pytest.fixture
def workers(redis_client):
    beat(redis_client, *BUNDLED, "tiny-in1k")


def png(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 20, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_the_request_picks_the_model_and_its_queue(client, store, redis_client, workers):
    resp = client.post("/v1/generations", json={"model": "tiny-in1k", "labels": ["golden retriever"], "n": 2})
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]
    assert resp.json()["model"] == "tiny-in1k"
    spec = store.get(job)["spec"]
    assert spec["model"] == "tiny-in1k" and spec["images"][0]["labels"] == [207]
    assert redis_client.xlen("eqm:jobs:tiny-in1k") == 1 and redis_client.xlen("eqm:jobs:digits") == 0
    assert store.queue_depth("tiny-in1k") == 1 and store.queue_depth("digits") == 0 and store.queue_depth() == 1
    # Left out: the default (the first served) model, with its own classes and queue.
    resp = client.post("/v1/generations", json={"labels": [3]})
    assert resp.status_code == 202 and store.get(resp.json()["id"])["spec"]["model"] == "digits"
    assert redis_client.xlen("eqm:jobs:digits") == 1
    # The job's page needs no model.
    got = client.get(f"/v1/jobs/{job}")
    assert got.status_code == 200 and got.json()["model"] == "tiny-in1k" and got.json()["queue_position"] == 0


def test_classes_defaults_and_samplers_come_from_the_named_model(client, store, workers):
    bad = client.post("/v1/generations", json={"model": "digits", "labels": ["golden retriever"]})
    assert bad.status_code == 422 and "golden retriever" in bad.text
    uncond = client.post("/v1/generations", json={"model": "em-digits", "labels": [3]})
    assert uncond.status_code == 422 and "em-digits is unconditional" in uncond.text
    ok = client.post("/v1/generations", json={"model": "em-digits"})
    assert ok.status_code == 202, ok.text
    spec = store.get(ok.json()["id"])["spec"]
    cards = {c["name"]: c for c in client.get("/v1/models").json()["models"]}
    assert spec["sampler"]["sampler"] == cards["em-digits"]["defaults"]["sampler"] == "heun-sde"
    assert spec["sampler"]["max_steps"] == cards["em-digits"]["defaults"]["max_steps"]
    latent = client.post("/v1/generations", json={"model": "tiny-in1k", "sampler": "heun-sde"})
    assert latent.status_code == 422 and "tiny-in1k" in latent.text
    assert cards["tiny-in1k"]["samplers"] == ["nag", "gd"] and "heun-sde" in cards["digits"]["samplers"]


def test_unknown_model_is_404_listing_the_served_models(client, redis_client, workers):
    for path, kwargs in (("/v1/generations", {"json": {"model": "EqM-XL/2"}}),
                         ("/v1/compositions", {"json": {"model": "nope", "labels": [1, 2]}}),
                         ("/v1/denoise", {"data": {"model": "nope"}, "files": {"image": ("x.png", png(), "image/png")}}),
                         ("/v1/scores", {"data": {"model": "nope"}, "files": {"image": ("x.png", png(), "image/png")}})):
        resp = client.post(path, **kwargs)
        assert resp.status_code == 404, (path, resp.text)
        detail = resp.json()["detail"]
        assert "unknown model" in detail and all(repr(m) in detail for m in (*BUNDLED, "tiny-in1k")), detail
    oa = client.post("/v1/images/generations", json={"prompt": "3", "model": "dall-e-3"})
    assert oa.status_code == 404
    err = oa.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "invalid_request_error"
    assert "'digits-e'" in err["message"]
    edit = client.post("/v1/images/edits", data={"prompt": "3", "model": "gpt-image-1"},
                       files={"image": ("x.png", png(), "image/png")})
    assert edit.status_code == 404 and edit.json()["error"]["code"] == "model_not_found"
    assert [k for k in redis_client.keys("eqm:job:*")] == []


def test_uploads_take_the_named_models_size(client, store, redis_client, workers):
    resp = client.post("/v1/denoise", data={"model": "tiny-in1k", "label": "7"},
                       files={"image": ("x.png", png((300, 200)), "image/png")})
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]
    stored = Image.open(io.BytesIO(redis_client.get(f"eqm:job:{job}:input")))
    assert stored.size == (32, 32) and stored.mode == "RGB"
    resp = client.post("/v1/denoise", files={"image": ("x.png", png((300, 200)), "image/png")})
    stored = Image.open(io.BytesIO(redis_client.get(f"eqm:job:{resp.json()['id']}:input")))
    assert stored.size == (8, 8) and stored.mode == "L"


def test_openai_routes_queue_on_the_named_model(client, store, workers):
    resp = client.post("/v1/images/generations", json={"prompt": "7", "model": "digits-e", "n": 1})
    assert resp.status_code == 202           # no worker runs it here: the pending answer names the job
    spec = store.get(resp.headers["x-eqm-job-id"])["spec"]
    assert spec["model"] == "digits-e" and spec["images"][0]["labels"] == [7]


def test_admission_is_per_model(client, store, redis_client):
    beat(redis_client, "digits", "digits-e")                       # nobody serves em-digits or tiny-in1k
    for _ in range(2):
        assert client.post("/v1/generations", json={"model": "digits"}).status_code == 202
    full = client.post("/v1/generations", json={"model": "digits"})
    assert full.status_code == 429 and "2 jobs waiting" in full.text
    assert client.post("/v1/generations", json={"model": "digits-e"}).status_code == 202   # its own queue
    none = client.post("/v1/generations", json={"model": "em-digits"})
    assert none.status_code == 503 and "no live worker serves model 'em-digits'" in none.text
    assert store.queue_depth("digits") == 2 and store.queue_depth("digits-e") == 1 and store.queue_depth() == 3


def test_models_list_every_model_with_workers_and_queues(client, redis_client):
    beat(redis_client, "digits", "digits-e", name="shared")
    beat(redis_client, "digits", name="solo")
    assert client.post("/v1/generations", json={"model": "digits-e"}).status_code == 202
    cards = client.get("/v1/models").json()["models"]
    assert [c["name"] for c in cards] == [*BUNDLED, "tiny-in1k"]
    by = {c["name"]: c for c in cards}
    assert by["digits"]["default"] and not by["digits-e"]["default"]
    assert (by["digits"]["workers"], by["digits-e"]["workers"], by["em-digits"]["workers"]) == (2, 1, 0)
    assert by["digits-e"]["queue_depth"] == 1 and by["digits"]["queue_depth"] == 0
    assert by["digits"]["loaded"] and not by["em-digits"]["loaded"]
    assert by["digits-e"]["energy_form"] != "none" and by["em-digits"]["num_classes"] == 0
    assert by["tiny-in1k"]["image_size"] == 32 and by["digits"]["image_size"] == 8
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and "none serves 'em-digits', 'tiny-in1k'" in ready["detail"]


def test_two_checkpoints_with_one_name_are_refused(redis_url, tmp_path):
    from models.files import CheckpointError
    with pytest.raises(CheckpointError, match="both named 'digits'"):
        with TestClient(create_app(Settings(redis_url=redis_url, checkpoints=("digits", "digits")))):
            pass


def test_repeated_checkpoint_flags_reach_the_worker_process(monkeypatch):
    """``eqm worker --checkpoint A --checkpoint B`` and EQM_CHECKPOINTS both give the worker every model, and the
    supervisor's argv passes them all on (service.worker.many serves them from one process)."""
    import argparse

    from service.worker.many import model_configs
    from service.worker_config import add_worker_arguments, config_from_args, worker_flags
    p = argparse.ArgumentParser()
    add_worker_arguments(p)
    cfg = config_from_args(p.parse_args(["--redis-url", "redis://x", "--checkpoint", "digits", "--checkpoint",
                                         "em-digits"]), name="host:1:cpu")
    assert cfg.checkpoints == ("digits", "em-digits") and cfg.checkpoint == "digits"
    argv = worker_flags(cfg)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--checkpoint"] == ["digits", "em-digits"]
    assert [(c.checkpoint, c.name) for c in model_configs(cfg)] == [("digits", "host:1:cpu:digits"),
                                                                     ("em-digits", "host:1:cpu:em-digits")]
    monkeypatch.setenv("EQM_CHECKPOINTS", "digits-e,em-digits")
    cfg = config_from_args(p.parse_args(["--redis-url", "redis://x"]))
    assert cfg.checkpoints == ("digits-e", "em-digits") and cfg.checkpoint == "digits-e"
    one = config_from_args(p.parse_args(["--redis-url", "redis://x", "--checkpoint", "digits"]))
    assert one.checkpoints == ("digits",)


def test_a_removed_model_fails_its_queued_jobs_with_the_reason(redis_url, redis_client, store):
    with TestClient(create_app(Settings(redis_url=redis_url, checkpoints=("digits", "digits-e")))) as c:
        beat(redis_client, "digits", "digits-e")
        gone = c.post("/v1/generations", json={"model": "digits-e", "labels": [2]}).json()["id"]
        kept = c.post("/v1/generations", json={"model": "digits", "labels": [2]}).json()["id"]
    redis_client.delete("eqm:workers")                     # the digits-e workers went away with the model
    with TestClient(create_app(Settings(redis_url=redis_url, checkpoints=("digits",)))) as c:
        job = c.get(f"/v1/jobs/{gone}").json()
        assert job["status"] == "failed" and "model 'digits-e' was removed" in job["error"]
        assert c.get(f"/v1/jobs/{kept}").json()["status"] == "queued"
        assert store.queue_depth() == 1 and not redis_client.exists("eqm:jobs:digits-e")
        events = c.get(f"/v1/jobs/{gone}/events", headers={"Accept": "text/event-stream"}).text
        assert "event: failed" in events


def test_job_series_carry_the_model_bounded_to_the_served_ones(client, workers):
    from prometheus_client.parser import text_string_to_metric_families
    assert client.post("/v1/generations", json={"model": "digits-e", "n": 3}).status_code == 202
    assert client.post("/v1/generations", json={"model": "nope"}).status_code == 404
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]
    assert value("eqm_api_jobs_submitted_total", kind="generate", model="digits-e") == 1
    assert value("eqm_api_images_requested_total", kind="generate", model="digits-e") == 3
    assert value("eqm_api_jobs_submitted_total", kind="generate", model="em-digits") == 0      # at 0 from the start
    assert value("eqm_model_queue_depth", model="digits-e") == 1 and value("eqm_model_queue_lag", model="digits-e") == 1
    assert value("eqm_model_queue_depth", model="digits") == 0 and value("eqm_live_workers", model="tiny-in1k") == 1
    models = {dict(labels).get("model") for _, labels in samples if dict(labels).get("model")}
    assert models == {*BUNDLED, "tiny-in1k"}                # an unknown name never becomes a label
