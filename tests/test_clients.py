"""Client conventions through HTTP against a real `eqm serve` (CPU worker, bundled digits model, two API keys):
idempotency keys, Prefer: wait, inline images, absolute links, job listing per key, PNG provenance and
`eqm sample --from-png`, energy scores. Queue position and CORS run in-process (no worker: jobs stay queued).
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clientstack import ROOT, serve, service_env, stop
from models import resolve_checkpoint
from service.api import create_app
from service.embedded_redis import free_port
from service.images import read_provenance
from service.jobstore import ImageResult, JobStore
from service.settings import Settings

pytestmark = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(), reason="the bundled digits model is missing")
KEYS = ("alice-key", "bob-key")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(redis_server, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("clients") / "serve.log"
    proc = serve(redis_server.url, port, log, EQM_KEY_PREFIX=f"cli{uuid.uuid4().hex[:8]}",
                 EQM_API_KEYS=",".join(KEYS), EQM_MAX_IMAGES_PER_JOB="64", EQM_WAIT_TIMEOUT_S="60")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


@pytest.fixture
def alice(server):
    with httpx.Client(base_url=server, headers=auth(KEYS[0]), timeout=90) as c:
        yield c


@pytest.fixture
def bob(server):
    with httpx.Client(base_url=server, headers=auth(KEYS[1]), timeout=90) as c:
        yield c


def test_idempotency_key(alice, bob):
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    body = {"labels": [4], "n": 2, "seed": 0, "max_steps": 20}
    first = alice.post("/v1/generations", json=body, headers=key)
    assert first.status_code == 202, first.text
    # the same request, keys in another order: the original job, 200
    again = alice.post("/v1/generations", content=json.dumps(dict(reversed(body.items()))),
                       headers={**key, "Content-Type": "application/json"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text
    assert again.headers["idempotent-replayed"] == "true"
    # the same key with another body: 422, and no job
    other = alice.post("/v1/generations", json={**body, "seed": 1}, headers=key)
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["message"], other.text
    # another caller's key space is its own
    bobs = bob.post("/v1/generations", json=body, headers=key)
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]
    listed = [j["id"] for j in alice.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
    assert listed.count(first.json()["id"]) == 1
    # multipart: the same upload under another boundary is the same request
    upload = io.BytesIO()
    Image.new("L", (8, 8), 40).save(upload, "PNG")
    form = dict(data={"label": "3", "max_steps": "5"}, files={"image": ("a.png", upload.getvalue(), "image/png")})
    key = {"Idempotency-Key": f"denoise-{uuid.uuid4()}"}
    one, two = (alice.post("/v1/denoise", headers=key, **form) for _ in range(2))
    assert (one.status_code, two.status_code) == (202, 200) and one.json()["id"] == two.json()["id"]
    form["data"]["max_steps"] = "6"
    assert alice.post("/v1/denoise", headers=key, **form).status_code == 422


def test_prefer_wait_inline_and_absolute_links(alice, server):
    resp = alice.post("/v1/generations?inline=true", json={"labels": [1], "n": 2, "seed": 0, "max_steps": 20},
                      headers={"Prefer": "wait=30"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["preference-applied"] == "wait=30"
    job = resp.json()
    assert job["status"] == "done" and job["links"]["self"] == f"{server}/v1/jobs/{job['id']}"
    for img in job["images"]:
        assert img["url"].startswith(server + "/v1/jobs/")
        inline = base64.b64decode(img["b64_json"])
        assert inline == alice.get(img["url"]).content            # the same bytes as the download
    # behind a proxy: links follow X-Forwarded-Proto/Host/Prefix
    proxied = alice.get(f"/v1/jobs/{job['id']}", headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host":
                                                           "images.example.com", "X-Forwarded-Prefix": "/eqm"})
    assert proxied.json()["links"]["self"] == f"https://images.example.com/eqm/v1/jobs/{job['id']}"
    assert proxied.json()["images"][0]["b64_json"] is None                 # only with ?inline=true
    # Prefer: wait=0 answers at once
    quick = alice.post("/v1/generations", json={"labels": [1], "max_steps": 1000, "grad_norm_threshold": 0},
                       headers={"Prefer": "wait=0"})
    assert quick.status_code == 202 and quick.headers["preference-applied"] == "wait=0"
    alice.delete(quick.json()["links"]["self"])


def test_listing_is_per_key_newest_first(alice, bob):
    mine = []
    for label in (2, 3, 5):
        resp = alice.post("/v1/generations", json={"labels": [label], "max_steps": 5, "seed": label})
        mine.append(resp.json()["id"])
    theirs = bob.post("/v1/generations?wait=true", json={"labels": [9], "max_steps": 5}).json()["id"]
    page = alice.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["jobs"]] == mine[::-1][:2]
    rest = alice.get(page["next"]).json()
    assert rest["jobs"][0]["id"] == mine[0]
    everything = [j["id"] for j in alice.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
    assert theirs not in everything and set(mine) <= set(everything)
    assert theirs in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
    bob_done = bob.get("/v1/jobs", params={"status": "done"}).json()["jobs"]
    assert bob_done and all(j["status"] == "done" for j in bob_done)
    assert alice.get("/v1/jobs", params={"status": "nonsense"}).status_code == 422
    # another key's job is unknown to this one, on every job route
    for method, path in (("GET", f"/v1/jobs/{theirs}"), ("GET", f"/v1/jobs/{theirs}/images/0"),
                         ("GET", f"/v1/jobs/{theirs}/events"), ("DELETE", f"/v1/jobs/{theirs}")):
        assert alice.request(method, path).status_code == 404, path
    assert bob.get(f"/v1/jobs/{theirs}").json()["status"] == "done"


def test_png_provenance_reproduces_with_eqm_sample(alice, tmp_path):
    job = alice.post("/v1/compositions?wait=true", json={"labels": [3, 8], "weights": [0.6, 0.4], "seed": 11,
                                                         "max_steps": 40, "guidance_scale": 1.5}).json()
    assert job["status"] == "done", job
    png = alice.get(job["images"][0]["url"]).content
    rec = read_provenance(png)
    assert rec["labels"] == [3, 8] and rec["weights"] == [0.6, 0.4] and rec["seed"] == 11
    assert rec["steps"] == job["images"][0]["steps"] and rec["grad_norm"] == pytest.approx(job["images"][0]["grad_norm"], rel=1e-3)
    assert Image.open(io.BytesIO(png)).text["parameters"].startswith("EqM compose of 3+8")
    src = tmp_path / "mix.png"
    src.write_bytes(png)
    out = subprocess.run([sys.executable, "-m", "service.cli", "sample", "--from-png", str(src), "--out",
                          str(tmp_path / "again"), "--device", "cpu"], cwd=ROOT, env=service_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    again = (tmp_path / "again" / "mix.png").read_bytes()
    a = np.array(Image.open(io.BytesIO(png)), dtype=np.int16)
    b = np.array(Image.open(io.BytesIO(again)), dtype=np.int16)
    assert np.abs(a - b).max() <= 1                      # the same image (to float rounding of batched matmuls)
    assert read_provenance(again)["steps"] == rec["steps"]
    bad = tmp_path / "plain.png"
    Image.new("L", (8, 8)).save(bad)
    out = subprocess.run([sys.executable, "-m", "service.cli", "sample", "--from-png", str(bad), "--out",
                          str(tmp_path / "x")], cwd=ROOT, env=service_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "records no generation parameters" in out.stderr


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_scores_separate_digits_from_noise(alice):
    from models.eqm.digits import to_uint8_images
    from sklearn.datasets import load_digits
    digits = to_uint8_images(load_digits().data[-8:])[..., 0]           # real digits
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(8, 8, 8))
    files = [("image", (f"{i}.png", _png(img), "image/png")) for i, img in enumerate([*digits, *noise])]
    resp = alice.post("/v1/scores", files=files)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["status"] == "done" and out["label"] is None and len(out["scores"]) == 16
    real = [s["in_distribution"] for s in out["scores"][:8]]
    fake = [s["in_distribution"] for s in out["scores"][8:]]
    assert min(real) > max(fake)
    norms = [s["grad_norm"] for s in out["scores"]]
    assert max(norms[:8]) < min(norms[8:])
    assert alice.get(out["url"]).json() == out
    target = int(load_digits().target[-1])
    cond = alice.post("/v1/scores", data={"label": str(target)}, files=[files[7]]).json()
    assert cond["label"] == target and cond["scores"][0]["in_distribution"] > 0
    assert alice.post("/v1/scores", data={"label": "11"}, files=[files[0]]).status_code == 422
    assert alice.post("/v1/scores", files=[("image", ("x.txt", b"text", "text/plain"))]).status_code == 415


# -- in-process: queue position, ETA and CORS (no worker, so jobs stay queued) -----------------------

@pytest.fixture
def queued_api(redis_url):
    client = TestClient(create_app(Settings(redis_url=redis_url, cors_origins=("https://app.example",))))
    with client:
        r = client.app.state.api.redis
        r.hset("eqm:workers", "w1", json.dumps({"device": "cpu", "model": "digits", "seen": time.time() + 3600}))
        yield client


def test_queue_position_and_eta(queued_api):
    c = queued_api
    ids = [c.post("/v1/generations", json={"labels": [1], "n": 2}).json()["id"] for _ in range(3)]
    first = c.get(f"/v1/jobs/{ids[0]}").json()
    assert first["queue_position"] == 0 and first["eta_s"] is None        # no finished jobs yet: no estimate
    # history: one finished job of 4 images that ran 2 s -> 2 images/s
    store = JobStore(c.app.state.api.redis)
    done = c.post("/v1/generations", json={"labels": [2], "n": 4}).json()["id"]
    store.r.srem(store.keys.queued, done)
    store.r.hset(store.keys.job(done), mapping={"status": "running", "started": time.time() - 2})
    store.finish(done, "done", images=[ImageResult(k, 5, 0.1, True) for k in range(4)])
    store.r.hset(store.keys.job(done), "finished", float(store.r.hget(store.keys.job(done), "started")) + 2)
    third = c.get(f"/v1/jobs/{ids[2]}").json()
    assert third["queue_position"] == 2
    assert third["eta_s"] == pytest.approx((2 + 2 + 2) / 2.0, rel=0.01)      # 6 images at 2 images/s
    c.delete(f"/v1/jobs/{ids[0]}")
    assert c.get(f"/v1/jobs/{ids[2]}").json()["queue_position"] == 1
    assert c.get(f"/v1/jobs/{done}").json()["queue_position"] is None


def test_cors(queued_api, redis_url):
    pre = queued_api.options("/v1/generations", headers={"Origin": "https://app.example",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "content-type,idempotency-key"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    other = queued_api.options("/v1/generations", headers={"Origin": "https://evil.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    got = queued_api.get("/v1/models", headers={"Origin": "https://app.example"})
    assert got.headers["access-control-allow-origin"] == "https://app.example"
    with TestClient(create_app(Settings(redis_url=redis_url))) as off:                   # off by default
        pre = off.options("/v1/generations", headers={"Origin": "https://app.example",
                                                      "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


def test_openai_route_still_running_is_202_not_5xx(redis_url):
    with TestClient(create_app(Settings(redis_url=redis_url, wait_timeout_s=0.3))) as c:
        c.app.state.api.redis.hset("eqm:workers", "w1", json.dumps({"model": "digits", "seen": time.time() + 3600}))
        resp = c.post("/v1/images/generations", json={"prompt": "4", "n": 2}, headers={"Idempotency-Key": "k1"})
        assert resp.status_code == 202, resp.text
        body = resp.json()
        assert body["data"] == [] and body["status"] == "queued" and resp.headers["location"] == body["url"]
        assert c.get(body["url"]).json()["status"] == "queued"
        again = c.post("/v1/images/generations", json={"prompt": "4", "n": 2}, headers={"Idempotency-Key": "k1"})
        assert again.json()["id"] == body["id"]                    # a retry does not queue the images twice


def test_prefer_and_forwarded_headers_are_parsed_strictly(queued_api):
    from starlette.requests import Request

    from service.api.conventions import prefer_wait, public_base

    def request(*headers: tuple[str, str]) -> Request:
        return Request({"type": "http", "method": "GET", "path": "/", "scheme": "http", "server": ("api", 8000),
                        "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "query_string": b""})

    assert prefer_wait(request(("Prefer", "respond-async, wait=12"))) == 12
    assert prefer_wait(request(("Prefer", "handling=lenient"))) is None
    assert prefer_wait(request(("Prefer", "wait=abc"))) is None
    settings = Settings()
    assert public_base(request(), settings) == "http://api:8000"
    assert public_base(request(("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Host", "a b/c"),
                               ("X-Forwarded-Prefix", "/x?y")), settings) == "http://api:8000"
    assert public_base(request(("X-Forwarded-Proto", "https, http"), ("X-Forwarded-Host", "img.example:8443")),
                       settings) == "https://img.example:8443"
    assert public_base(request(("X-Forwarded-Host", "evil.example")),
                       Settings(public_url="https://eqm.example/api/")) == "https://eqm.example/api"
    # keys off: every job is the anonymous caller's, listed newest first
    ids = [queued_api.post("/v1/generations", json={"labels": [k]}).json()["id"] for k in (1, 2)]
    assert [j["id"] for j in queued_api.get("/v1/jobs").json()["jobs"]][:2] == ids[::-1]
    bad_key = queued_api.post("/v1/generations", json={"labels": [1]}, headers={"Idempotency-Key": "x" * 300})
    assert bad_key.status_code == 422
    assert queued_api.post("/v1/generations?inlne=true", json={"labels": [1]}).status_code == 422
    assert queued_api.get("/v1/jobs?limt=3").json()["message"].startswith("query.limt: unknown query parameter")
    assert queued_api.get(f"/v1/jobs/{ids[0]}?inline=true").status_code == 200
