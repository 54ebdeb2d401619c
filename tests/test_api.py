"""HTTP API in-process (FastAPI TestClient) against a real Redis, with no worker process.

A worker is simulated where a test needs one: a heartbeat in ``P:workers`` for admission, and
``JobStore`` calls for progress and results, exactly the writes a worker makes.
"""
from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.eqm.digits import CLASS_NAMES, DIGITS_DEFAULTS, digits_config
from models.eqm.network import EqM, EqMConfig
from service.api import create_app
from service.jobstore import ImageResult, JobSpec, JobStore
from service.settings import Settings


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    """A model file with the bundled digits model's metadata (random weights: the API never runs it)."""
    path = tmp_path_factory.mktemp("models") / "digits.safetensors"
    config = digits_config()
    save_safetensors(EqM(config), ModelSpec(config, "all", "identity", CLASS_NAMES), path)
    return str(path)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A tiny 1000-class latent model without class names: the API falls back to ImageNet's."""
    path = tmp_path_factory.mktemp("models") / "tiny-in1k.safetensors"
    config = EqMConfig(arch="custom", input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                       num_heads=2, num_classes=1000)
    save_safetensors(EqM(config), ModelSpec(config, "official", "sd-vae", sampler_defaults={"cfg_scale": 4.0}), path)
    return str(path)


@pytest.fixture
def make_client(redis_url, digits_file):
    """``make_client(**settings)`` -> a started TestClient; all are closed after the test."""
    clients = []

    def make(**overrides) -> TestClient:
        values = dict(redis_url=redis_url, checkpoint=digits_file, max_upload_bytes=50_000, max_upload_pixels=1_000_000)
        values.update(overrides)
        client = TestClient(create_app(Settings(**values)), raise_server_exceptions=True)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def store(redis_client):
    return JobStore(redis_client)


def heartbeat(r: redis.Redis, model: str = "digits", age_s: float = 0.0, name: str = "w1") -> None:
    """What a live worker writes every heartbeat."""
    r.hset("eqm:workers", name, json.dumps({"device": "cpu", "model": model, "seen": time.time() - age_s,
                                            "metrics_url": "http://worker-host:9400/metrics"}))


@pytest.fixture
def worker(redis_client):
    heartbeat(redis_client)


def png_bytes(size=(40, 30), mode="RGB", color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def job_keys(r: redis.Redis) -> list[bytes]:
    return r.keys("eqm:job:*")


# -- submission writes the contract ------------------------------------------------------------

def test_generation_writes_jobspec(client, store, redis_client, worker):
    body = {"labels": [3, "7"], "n": 2, "seed": 10, "guidance_scale": 2.0, "sampler": "gd", "step_size": 0.05,
            "mu": 0.1, "max_steps": 20, "grad_norm_threshold": 0.5, "deadline_s": 30, "format": "webp", "priority": 3}
    t0 = time.time()
    resp = client.post("/v1/generations", json=body)
    assert resp.status_code == 202, resp.text
    out = resp.json()
    assert out["status"] == "queued" and out["kind"] == "generate" and out["num_images"] == 4
    assert resp.headers["location"] == out["links"]["self"] == f"http://testserver/v1/jobs/{out['id']}"
    assert out["links"]["images"][3] == f"http://testserver/v1/jobs/{out['id']}/images/3"

    rec = store.get(out["id"])
    spec = JobSpec.from_json(json.dumps(rec["spec"]))
    assert rec["status"] == "queued" and spec.kind == "generate" and spec.model == "digits"
    assert [i.labels for i in spec.images] == [[3], [3], [7], [7]]
    assert [i.seed for i in spec.images] == [10, 11, 12, 13]
    assert spec.cfg_scale == 2.0 and spec.format == "webp" and spec.priority == 3
    assert (spec.sampler.sampler, spec.sampler.step_size, spec.sampler.mu, spec.sampler.max_steps,
            spec.sampler.grad_norm_threshold) == ("gd", 0.05, 0.1, 20, 0.5)
    assert t0 + 30 <= spec.deadline <= time.time() + 30
    assert store.queue_depth() == 1
    assert redis_client.xlen("eqm:jobs:digits") == 1
    assert [e[1] for e in store.events(out["id"], block_ms=10)] == ["queued"]


def test_omitted_options_get_model_defaults(client, store, worker):
    resp = client.post("/v1/generations", json={})
    assert resp.status_code == 202, resp.text
    spec = store.get(resp.json()["id"])["spec"]
    d = DIGITS_DEFAULTS
    assert len(spec["images"]) == 1 and spec["images"][0]["labels"] == []        # unconditional
    assert spec["cfg_scale"] == d.cfg_scale
    assert spec["sampler"] == {"sampler": d.params.sampler, "step_size": d.params.step_size, "mu": d.params.mu,
                               "max_steps": d.params.max_steps, "grad_norm_threshold": d.grad_norm_threshold,
                               "epsilon_max": 0.0, "time_cutoff": 1.0}      # heun-sde settings, unused by nag
    assert 0 <= spec["images"][0]["seed"] < 2**31


def test_composition_writes_jobspec(client, store, worker):
    resp = client.post("/v1/compositions", json={"labels": ["3", 8], "weights": [0.7, 0.3], "n": 3, "seed": 1})
    assert resp.status_code == 202, resp.text
    spec = store.get(resp.json()["id"])["spec"]
    assert spec["kind"] == "compose" and spec["cfg_scale"] == DIGITS_DEFAULTS.composition_cfg_scale
    assert [(i["labels"], i["weights"], i["seed"]) for i in spec["images"]] == [([3, 8], [0.7, 0.3], s) for s in (1, 2, 3)]


def test_denoise_stores_cropped_grey_input(client, store, redis_client, worker):
    # 30x10 with a white centre square and black sides: a centre crop keeps only the white part.
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    resp = client.post("/v1/denoise", data={"label": "4", "noise_level": "0.6", "n": "2", "seed": "5"},
                       files={"image": ("digit.png", buf.getvalue(), "image/png")})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    spec = store.get(job_id)["spec"]
    assert spec["kind"] == "denoise" and spec["noise_level"] == 0.6
    assert [(i["labels"], i["seed"]) for i in spec["images"]] == [([4], 5), ([4], 6)]
    assert spec["sampler"]["max_steps"] == DIGITS_DEFAULTS.denoise_steps
    stored = Image.open(io.BytesIO(redis_client.get(f"eqm:job:{job_id}:input")))
    assert stored.format == "PNG" and stored.size == (8, 8) and stored.mode == "L"
    assert np.asarray(stored).min() >= 250


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_denoise_accepts_jpeg_and_webp_without_label(client, store, redis_client, worker, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(buf, fmt)
    resp = client.post("/v1/denoise", files={"image": ("x", buf.getvalue(), "application/octet-stream")})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert store.get(job_id)["spec"]["images"][0]["labels"] == []
    assert Image.open(io.BytesIO(redis_client.get(f"eqm:job:{job_id}:input"))).size == (8, 8)


def test_imagenet_names_for_a_1000_class_model(make_client, store, redis_client, imagenet_file):
    heartbeat(redis_client, model="tiny-in1k")
    client = make_client(checkpoint=imagenet_file)
    card = client.get("/v1/models").json()["models"][0]
    assert card["num_classes"] == 1000 and card["class_names"][207] == "golden retriever"
    assert card["image_size"] == 32 and card["channels"] == 3 and card["codec"] == "sd-vae"
    assert card["defaults"]["step_size"] == 0.0017 and card["defaults"]["max_steps"] == 249      # the paper's
    assert card["defaults"]["guidance_scale"] == 4.0                                              # recorded
    resp = client.post("/v1/generations", json={"labels": ["golden retriever", "n01440764", "Goldfish", 999]})
    assert resp.status_code == 202, resp.text
    assert [i["labels"] for i in store.get(resp.json()["id"])["spec"]["images"]] == [[207], [0], [1], [999]]
    resp = client.post("/v1/generations", json={"labels": ["crane"]})
    assert resp.status_code == 422 and "134" in resp.json()["message"] and "517" in resp.json()["message"]


def test_models_lists_classes_defaults_and_limits(client):
    card = client.get("/v1/models").json()["models"][0]
    assert card["name"] == "digits" and card["arch"] == "EqM-Digits/2"
    assert card["class_names"] == list(CLASS_NAMES)
    assert (card["image_size"], card["channels"], card["latent_shape"]) == (8, 1, [1, 8, 8])
    assert card["defaults"]["guidance_scale"] == DIGITS_DEFAULTS.cfg_scale
    assert card["limits"]["max_upload_bytes"] == 50_000
    assert "center-crop" in card["upload_preprocessing"]


# -- bad input: 422 with the field, nothing written -----------------------------------------------

BAD_JSON = [
    ("/v1/generations", {"labels": [12]}, ["body", "labels", 0], "out of range"),
    ("/v1/generations", {"labels": [1, -1]}, ["body", "labels", 1], "out of range"),
    ("/v1/generations", {"labels": ["eleven"]}, ["body", "labels", 0], "unknown class"),
    ("/v1/generations", {"labels": [1.5]}, ["body", "labels", 0], ""),
    ("/v1/generations", {"guidance_scale": 21}, ["body", "guidance_scale"], "less than or equal"),
    ("/v1/generations", {"guidance_scale": -0.5}, ["body", "guidance_scale"], "greater than or equal"),
    ("/v1/generations", {"max_steps": 0}, ["body", "max_steps"], ""),
    ("/v1/generations", {"max_steps": 1001}, ["body", "max_steps"], ""),
    ("/v1/generations", {"n": 0}, ["body", "n"], ""),
    ("/v1/generations", {"n": 65}, ["body", "n"], "more than 64 per job"),
    ("/v1/generations", {"labels": [1, 2, 3], "n": 30}, ["body", "n"], "more than 64 per job"),
    ("/v1/generations", {"step_size": 0}, ["body", "step_size"], ""),
    ("/v1/generations", {"mu": 1.0}, ["body", "mu"], ""),
    ("/v1/generations", {"grad_norm_threshold": -1}, ["body", "grad_norm_threshold"], ""),
    ("/v1/generations", {"sampler": "adam"}, ["body", "sampler"], ""),
    ("/v1/generations", {"format": "gif"}, ["body", "format"], ""),
    ("/v1/generations", {"deadline_s": 0}, ["body", "deadline_s"], ""),
    ("/v1/generations", {"seed": -1}, ["body", "seed"], ""),
    ("/v1/generations", {"stepsize": 0.1}, ["body", "stepsize"], "did you mean 'step_size'?"),
    ("/v1/generations", {"steps": 30}, ["body", "steps"], "did you mean 'max_steps'?"),
    ("/v1/generations", {"n": 100000}, ["body", "n"], "more than 64 per job"),
    ("/v1/compositions", {"labels": [1, 2], "cfg_scale": 2}, ["body", "cfg_scale"], "did you mean 'guidance_scale'?"),
    ("/v1/compositions", {"labels": [1, 2], "zzz": 2}, ["body", "zzz"], "; the fields are: deadline_s, "),
    ("/v1/compositions", {"labels": [1]}, ["body", "labels"], ""),
    ("/v1/compositions", {"labels": [1, 2, 3, 4, 5, 6, 7, 8]}, ["body", "labels"], ""),
    ("/v1/compositions", {"labels": [1, 2], "weights": [1.0]}, ["body", "weights"], "1 weights given for 2 labels"),
    ("/v1/compositions", {"labels": [1, 2], "weights": [1.0, 11]}, ["body", "weights", 1], ""),
    ("/v1/compositions", {"labels": [1, 10]}, ["body", "labels", 1], "out of range"),
]


@pytest.mark.parametrize("path,body,loc,reason", BAD_JSON, ids=[f"{p[4:]}-{'-'.join(map(str, l[1:]))}" for p, _, l, _ in BAD_JSON])
def test_bad_json_is_422_with_field(client, redis_client, worker, path, body, loc, reason):
    resp = client.post(path, json=body)
    assert resp.status_code == 422, resp.text
    out = resp.json()
    assert any(d["loc"] == loc for d in out["detail"]), out
    assert reason in out["message"] or reason in json.dumps(out["detail"])
    assert ".".join(map(str, loc)) in out["message"] or len(out["detail"]) > 1
    assert job_keys(redis_client) == [] and redis_client.xlen("eqm:jobs:digits") == 0


@pytest.mark.parametrize("raw", [b'{"guidance_scale": NaN}', b'{"step_size": Infinity}', b"{not json", b"[1, 2]",
                                 b"[" * 5000 + b"]" * 5000, b'{"n": ' + b"9" * 5000 + b"}", b'{"labels": ["\xff"]}'],
                         ids=["nan", "inf", "syntax", "array", "deep", "huge-int", "not-utf8"])
def test_malformed_json_is_422(client, redis_client, worker, raw):
    resp = client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["message"].startswith("body"), resp.json()
    assert job_keys(redis_client) == []


BAD_FORMS = [
    ({"label": "10"}, ["body", "label", 0], "out of range"),
    ({"noise_level": "1.5"}, ["body", "noise_level"], ""),
    ({"max_steps": "5000"}, ["body", "max_steps"], ""),
    ({"n": "100"}, ["body", "n"], "more than 64"),
    ({"colour": "red"}, ["body", "colour"], "unknown form field"),
]


@pytest.mark.parametrize("form,loc,reason", BAD_FORMS, ids=[l[1] for _, l, _ in BAD_FORMS])
def test_bad_denoise_form_is_422(client, redis_client, worker, form, loc, reason):
    resp = client.post("/v1/denoise", data=form, files={"image": ("x.png", png_bytes(), "image/png")})
    assert resp.status_code == 422, resp.text
    assert any(d["loc"] == loc for d in resp.json()["detail"]) and reason in resp.text
    assert job_keys(redis_client) == []


def test_denoise_without_image_is_422(client, worker):
    resp = client.post("/v1/denoise", data={"label": "3"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "image"]


def test_json_sent_to_denoise_says_it_takes_a_form(client, redis_client, worker):
    resp = client.post("/v1/denoise", json={"label": 3, "noise_level": 0.6})
    assert resp.status_code == 422, resp.text
    assert resp.json()["message"].startswith("body: /v1/denoise takes a multipart form (the image as a file field "
                                             "'image'"), resp.json()
    assert resp.json()["message"].endswith("not JSON")
    assert job_keys(redis_client) == []


def test_models_reports_the_upload_pixel_limit_that_is_enforced(make_client, worker):
    """The pixel limit /v1/models states is the one uploads meet: 1024^2 for an 8x8 model, not the setting's cap."""
    client = make_client(max_upload_pixels=16_000_000, max_upload_bytes=10 << 20)
    limit = client.get("/v1/models").json()["models"][0]["limits"]["max_upload_pixels"]
    assert limit == 1024 * 1024
    side = 1025                                            # just over: a 1025 x 1024 image is refused, 1024^2 is not
    for width, status in ((side, 413), (1024, 202)):
        buf = io.BytesIO()
        Image.new("L", (width, 1024)).save(buf, format="PNG")
        resp = client.post("/v1/denoise", data={"label": "3"}, files={"image": ("x.png", buf.getvalue(), "image/png")})
        assert resp.status_code == status, (width, resp.text)


# -- uploads: 413, 415, bombs -----------------------------------------------------------------

def test_non_image_upload_is_415(client, redis_client, worker):
    for data in (b"hello, not an image", b"GIF89a" + b"\0" * 40, b""):
        resp = client.post("/v1/denoise", files={"image": ("x.png", data, "image/png")})
        assert resp.status_code == 415, resp.text
        assert "PNG, JPEG or WebP" in resp.json()["detail"]
    assert job_keys(redis_client) == []


def test_corrupt_png_is_422(client, redis_client, worker):
    data = png_bytes((64, 64))
    resp = client.post("/v1/denoise", files={"image": ("x.png", data[:60], "image/png")})
    assert resp.status_code == 422, resp.text
    assert job_keys(redis_client) == []


def test_upload_over_byte_limit_is_413(client, redis_client, worker):
    resp = client.post("/v1/denoise", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 120_000, "image/png")})
    assert resp.status_code == 413, resp.text
    assert "limit" in resp.json()["detail"]
    assert job_keys(redis_client) == []


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    raw = png_bytes((1, 1), "L", 0)
    ihdr = struct.pack(">II", width, height) + raw[24:29]
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


@pytest.mark.parametrize("side", [2000, 30_000, 200_000])
def test_huge_dimensions_rejected_before_decoding(client, redis_client, worker, side):
    bomb = _png_with_size(side, side)
    assert len(bomb) < 200
    t0 = time.perf_counter()
    resp = client.post("/v1/denoise", files={"image": ("bomb.png", bomb, "image/png")})
    assert resp.status_code == 413, resp.text
    assert "pixels" in resp.json()["detail"] or "too large" in resp.json()["detail"]
    assert time.perf_counter() - t0 < 2.0
    assert job_keys(redis_client) == []


def test_oversized_body_refused_while_streaming(redis_url, digits_file, redis_client, worker):
    """A chunked upload (no Content-Length) is cut off once it passes the limit, not read to the end."""
    app = create_app(Settings(redis_url=redis_url, checkpoint=digits_file, max_upload_bytes=50_000))
    pulled = 0
    boundary = "eqmtestboundary"

    async def body():
        nonlocal pulled
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
               f"Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG\r\n\x1a\n"
        for _ in range(10_000):                  # 160 MB if read to the end
            pulled += 1
            yield b"\0" * 16_384

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
                return await ac.post("/v1/denoise", content=body(),
                                     headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    resp = asyncio.run(run())
    assert resp.status_code == 413, resp.text
    assert pulled < 20                           # ~ (50 KB + 64 KB form allowance) / 16 KB
    assert job_keys(redis_client) == []


def test_declared_content_length_over_limit_is_413_before_reading(client, worker):
    resp = client.post("/v1/generations", content=b"{}" + b" " * 70_000, headers={"content-type": "application/json"})
    assert resp.status_code == 413


# -- auth ---------------------------------------------------------------------------------------

def test_api_keys(make_client, redis_client, worker):
    client = make_client(api_keys=("key-one", "key-two"))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-one"},
                    {"Authorization": "Bearer "}, {"Authorization": "key-one"}):
        resp = client.post("/v1/generations", json={"labels": [1]}, headers=headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/models", headers=headers).status_code == 401
        assert client.get("/v1/jobs/abc", headers=headers).status_code == 401
    # an unauthenticated upload is refused before its body is looked at
    resp = client.post("/v1/denoise", files={"image": ("x.png", png_bytes(), "image/png")})
    assert resp.status_code == 401
    assert job_keys(redis_client) == []
    ok = client.post("/v1/generations", json={"labels": [1]}, headers={"Authorization": "Bearer key-two"})
    assert ok.status_code == 202, ok.text
    assert client.get(ok.json()["links"]["self"], headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert client.get(ok.json()["links"]["self"], headers={"Authorization": "Bearer key-one"}).status_code == 404
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/sd/workers").status_code == 401
    assert client.get("/sd/workers", headers={"Authorization": "Bearer key-one"}).status_code == 200
    assert client.get("/readyz").status_code == 200


# -- admission: 429 / 503 -----------------------------------------------------------------------

def test_queue_over_limit_is_429(make_client, store, worker):
    client = make_client(max_queue=2)
    for _ in range(2):
        assert client.post("/v1/generations", json={"labels": [1]}).status_code == 202
    resp = client.post("/v1/generations", json={"labels": [1]})
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["retry-after"]) > 0 and "queue is full" in resp.json()["detail"]
    assert store.queue_depth() == 2
    resp = client.post("/v1/denoise", files={"image": ("x.png", png_bytes(), "image/png")})
    assert resp.status_code == 429
    assert store.queue_depth() == 2


def test_no_live_worker_is_503(client, redis_client, store):
    resp = client.post("/v1/generations", json={"labels": [1]})
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) > 0
    assert "no live worker" in resp.json()["detail"]
    heartbeat(redis_client, age_s=60)                      # stale heartbeat: dead
    assert client.post("/v1/generations", json={"labels": [1]}).status_code == 503
    heartbeat(redis_client, model="EqM-XL-2")              # alive, but another model
    resp = client.post("/v1/generations", json={"labels": [1]})
    assert resp.status_code == 503 and "EqM-XL-2" in resp.json()["detail"]
    assert client.get("/readyz").status_code == 503
    assert store.queue_depth() == 0 and job_keys(redis_client) == []
    heartbeat(redis_client)
    assert client.get("/readyz").json()["status"] == "ready"


def test_redis_down_is_503(make_client):
    from service.embedded_redis import free_port
    client = make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert client.get("/healthz").status_code == 200
    for resp in (client.post("/v1/generations", json={"labels": [1]}), client.get("/v1/jobs/abc")):
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "5" and "Redis" in resp.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] is False
    assert "eqm_api_redis_up 0.0" in client.get("/metrics").text


# -- jobs: status, images, events, cancel -------------------------------------------------------

def _submit(client, **body) -> str:
    resp = client.post("/v1/generations", json={"labels": [2], "n": 2, "seed": 0, **body})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def _run_like_a_worker(store: JobStore, job_id: str, formats="png") -> None:
    """The writes a worker makes: start, progress, both images, done."""
    r, k = store.r, store.keys
    r.hset(k.job(job_id), mapping={"status": "running", "started": time.time(), "worker": "w1"})
    r.srem(k.queued, job_id)
    store.publish(job_id, "started", {"id": job_id})
    r.hset(k.job(job_id), "progress", json.dumps([{"steps": 7, "grad_norm": 1.5}, {"steps": 7, "grad_norm": 2.5}]))
    store.publish(job_id, "progress", {"id": job_id, "images": [{"steps": 7, "grad_norm": 1.5}]})
    for idx in range(2):
        r.set(k.image(job_id, idx), png_bytes((8, 8), "L", 100 + idx))
    results = [ImageResult(0, 12, 0.25, True), ImageResult(1, 60, 0.75, False)]
    store.finish(job_id, "done", images=results)


def test_job_status_images_and_events(client, store, worker):
    job_id = _submit(client)
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "queued" and [i["ready"] for i in status["images"]] == [False, False]
    assert client.get(f"/v1/jobs/{job_id}/images/0").status_code == 409

    _run_like_a_worker(store, job_id)
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "done" and status["worker"] == "w1"
    assert [(i["steps"], i["grad_norm"], i["stopped_early"], i["ready"]) for i in status["images"]] == [
        (12, 0.25, True, True), (60, 0.75, False, True)]
    assert status["timings"]["total_s"] >= status["timings"]["running_s"] >= 0
    assert [i["seed"] for i in status["images"]] == [0, 1] and status["images"][1]["labels"] == [2]

    img = client.get(f"/v1/jobs/{job_id}/images/1")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).getpixel((0, 0)) == 101
    assert client.get(f"/v1/jobs/{job_id}/images/2").status_code == 404

    text = client.get(f"/v1/jobs/{job_id}/events").text
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert events == ["queued", "started", "progress", "done"]
    ids = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("id: ")]
    resumed = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": ids[1]}).text
    assert [line[7:] for line in resumed.splitlines() if line.startswith("event: ")] == ["progress", "done"]
    assert client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "garbage"}).status_code == 200


def test_events_end_when_final_event_was_trimmed(client, store, redis_client, worker, monkeypatch):
    # The stream finds the final status at its next quiet-period look at the record: make that come soon.
    monkeypatch.setattr("service.api.jobs.KEEPALIVE_S", 0.2)
    job_id = _submit(client)
    store.finish(job_id, "failed", error="boom")
    redis_client.delete(store.keys.events(job_id))
    text = client.get(f"/v1/jobs/{job_id}/events").text
    assert "event: failed" in text and "boom" in text


def test_unknown_job_is_404(client):
    for method, path in (("GET", "/v1/jobs/0123abc"), ("GET", "/v1/jobs/0123abc/images/0"),
                         ("GET", "/v1/jobs/0123abc/events"), ("DELETE", "/v1/jobs/0123abc")):
        resp = client.request(method, path)
        assert resp.status_code == 404, (method, path, resp.text)
        assert "not found" in resp.json()["detail"]
    assert client.get("/v1/jobs/has:colon").status_code == 422
    assert client.get("/v1/jobs/abc/images/-1").status_code == 422


def test_cancel(client, store, redis_client, worker):
    queued = _submit(client)
    resp = client.delete(f"/v1/jobs/{queued}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert store.queue_depth() == 0 and store.get(queued)["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{queued}/images/0").status_code == 404      # never produced

    running = _submit(client)
    redis_client.hset(store.keys.job(running), "status", "running")
    redis_client.srem(store.keys.queued, running)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.keys.cancel_channel)
    resp = client.delete(f"/v1/jobs/{running}")
    assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    message = None
    for _ in range(20):
        message = message or pubsub.get_message(timeout=0.1)
    assert message and message["data"].decode() == running                 # the workers hear about it
    assert store.get(running)["cancel_requested"] is True
    pubsub.close()

    done = _submit(client)
    _run_like_a_worker(store, done)
    resp = client.delete(f"/v1/jobs/{done}")
    assert resp.status_code == 200 and resp.json() == {
        "id": done, "status": "done", "cancel_requested": False, "message": "the job is already done; nothing to cancel"}


def test_wait_returns_finished_job_or_202_at_timeout(make_client, store, worker):
    client = make_client(wait_timeout_s=0.3)
    resp = client.post("/v1/generations?wait=true", json={"labels": [1]})
    assert resp.status_code == 202 and resp.json()["status"] == "queued" and "images" in resp.json()

    client = make_client(wait_timeout_s=10)
    import threading

    def finish_soon():
        for _ in range(100):
            ids = [i.decode() for i in store.r.smembers(store.keys.queued)]
            if ids:
                for job_id in ids:
                    if store.get(job_id)["spec"]["images"][0]["labels"] == [5]:
                        _run_like_a_worker(store, job_id)
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=finish_soon)
    thread.start()
    resp = client.post("/v1/generations?wait=true", json={"labels": [5], "n": 2})
    thread.join()
    assert resp.status_code == 200 and resp.json()["status"] == "done"
    assert [i["ready"] for i in resp.json()["images"]] == [True, True]


# -- monitoring and schema ----------------------------------------------------------------------

def test_metrics_count_requests_by_route(client, store, worker):
    job_id = _submit(client)
    client.get(f"/v1/jobs/{job_id}")
    client.get("/v1/jobs/nothere")
    text = client.get("/metrics").text
    assert 'eqm_api_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'eqm_api_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'eqm_api_jobs_submitted_total{kind="generate",model="digits"} 1.0' in text
    assert "eqm_queue_depth 1.0" in text
    assert 'eqm_live_workers{model="digits"} 1.0' in text
    assert client.get("/sd/workers").json() == []        # this page includes the workers' series already


def test_api_metrics_share_the_workers_names():
    """A series both sides export (the queue depth) is one metric: same name, type and help."""
    from service.api.metrics import ApiMetrics
    from service.metrics import Metrics
    worker = {f.name: f for f in Metrics().registry.collect()}
    api = {f.name: f for f in ApiMetrics().registry.collect()}
    shared = set(worker) & set(api)
    assert "eqm_queue_depth" in shared
    for name in shared:
        assert (api[name].type, api[name].documentation) == (worker[name].type, worker[name].documentation)


def test_openapi_schema_is_valid_and_complete(client):
    schema = client.get("/openapi.json").json()
    try:
        from openapi_spec_validator import validate
    except ImportError:                          # the structural checks below still run
        validate = None
    if validate is not None:
        validate(schema)
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    assert {"/v1/generations", "/v1/compositions", "/v1/denoise", "/v1/jobs/{job_id}",
            "/v1/jobs/{job_id}/images/{index}", "/v1/jobs/{job_id}/events", "/v1/models", "/healthz", "/readyz",
            "/metrics"} <= set(paths)
    gen = paths["/v1/generations"]["post"]
    assert {"202", "200", "401", "413", "422", "429", "503"} <= set(gen["responses"])
    assert "Retry-After" in gen["responses"]["429"]["headers"]
    assert schema["components"]["schemas"]["GenerationRequest"]["examples"]
    assert "multipart/form-data" in paths["/v1/denoise"]["post"]["requestBody"]["content"]
    assert "415" in paths["/v1/denoise"]["post"]["responses"]
    assert "image/png" in paths["/v1/jobs/{job_id}/images/{index}"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    # No keys on this server: no security scheme, so /docs shows no lock icons and no "Authorize".
    assert "securitySchemes" not in schema["components"] and not any("security" in op for ops in paths.values()
                                                                     for op in ops.values())


def test_openapi_schema_names_the_bearer_key_when_keys_are_set(make_client):
    schema = make_client(api_keys=("k1",)).get("/openapi.json", headers={"Authorization": "Bearer k1"}).json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert schema["paths"]["/v1/generations"]["post"]["security"] == [{"HTTPBearer": []}]


@pytest.mark.parametrize("route,fields", [("/v1/denoise", {}), ("/v1/scores", {}),
                                          ("/v1/images/edits", {"prompt": "3"})])
def test_every_upload_route_has_the_models_pixel_limit(make_client, redis_client, worker, route, fields):
    """One upload path: every route refuses what the model's pixel limit refuses (8x8 digits: 1024 x 1024),
    not only the server-wide cap (16 M pixels by default), before a pixel is decoded."""
    client = make_client(max_upload_pixels=16_000_000)
    bomb = _png_with_size(2000, 2000)              # 4 M pixels: under the server-wide cap
    resp = client.post(route, data=fields, files={"image": ("bomb.png", bomb, "image/png")})
    assert resp.status_code == 413, resp.text
    body = resp.json()
    assert "1048576" in (body.get("detail") or body.get("error", {}).get("message") or body.get("message") or str(body))
    assert job_keys(redis_client) == []
