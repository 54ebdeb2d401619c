"""Inputs a client can trip on, in-process against a real Redis: every route applies the same label
parser and field limits, refuses what it would otherwise drop silently, and says what is wrong.

Also: an admin key lists every job, ``/metrics`` names worker addresses only for a request with a key,
and a composition in ``"sum"`` mode reports no guidance scale (it has none).
"""
from __future__ import annotations

import base64
import io
import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.eqm.digits import CLASS_NAMES, digits_config
from models.eqm.network import EqM
from service.api import create_app
from service.settings import Settings

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
WORKER_ADDRESS = "worker-host:9400"


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "digits.safetensors"
    config = digits_config()
    save_safetensors(EqM(config), ModelSpec(config, "all", "identity", CLASS_NAMES), path)
    return str(path)


@pytest.fixture
def make_client(redis_url, redis_client, digits_file):
    """A started TestClient (server errors come back as 500s, as a real server sends them) with a live
    worker's heartbeat in Redis, so submissions are admitted."""
    clients = []
    redis_client.hset("eqm:workers", "w1", json.dumps({"device": "cpu", "model": "digits", "seen": time.time() + 600,
                                                       "metrics_url": f"http://{WORKER_ADDRESS}/metrics"}))

    def make(**overrides) -> TestClient:
        values = dict(redis_url=redis_url, checkpoint=digits_file, max_upload_bytes=50_000,
                      max_upload_pixels=1_000_000, wait_timeout_s=0.1, metrics_from_workers=True)
        values.update(overrides)
        client = TestClient(create_app(Settings(**values)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def png(size=(8, 8), color=128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, "PNG")
    return buf.getvalue()


def job_count(redis_client) -> int:
    return len([k for k in redis_client.keys("eqm:job:*") if k.count(b":") == 2])


# -- one label parser, one set of limits ----------------------------------------------------------

@pytest.mark.parametrize("route,fields,files", [
    ("/v1/scores", {}, {"image": ("a.png", png(), "image/png")}),
    ("/v1/denoise", {}, {"image": ("a.png", png(), "image/png")}),
    ("/v1/inpaint", {}, {"image": ("a.png", png(), "image/png"), "mask": ("m.png", png(color=255), "image/png")}),
])
@pytest.mark.parametrize("label,reason", [("7" * 5000, "at most 200 characters"),
                                          ("1" * 150, "out of range"),
                                          ("x" * 100_000, "at most 200 characters")])
def test_a_huge_label_is_a_short_422_on_every_form_route(make_client, redis_client, route, fields, files, label,
                                                         reason):
    """5,000 digits made ``/v1/scores`` answer 500 (int() refuses over 4,300 digits) and a 100 KB label was
    echoed back twice; every form route now refuses both in one short line, and queues nothing."""
    client = make_client()
    resp = client.post(route, data={**fields, "label": label}, files=files)
    assert resp.status_code == 422, resp.text[:300]
    assert len(resp.content) < 2000
    assert reason in resp.text and label[:300] not in resp.text
    assert job_count(redis_client) == 0


def test_a_long_decimal_label_in_json_and_prompts_is_out_of_range(make_client, redis_client):
    client = make_client()
    resp = client.post("/v1/generations", json={"labels": ["0" * 10 + "1" * 190]})
    assert resp.status_code == 422 and "out of range" in resp.text
    resp = client.post("/v1/images/generations", json={"prompt": "9" * 900})
    assert resp.status_code in (400, 422) and "9" * 300 not in resp.text
    assert job_count(redis_client) == 0


def test_scores_takes_each_text_field_once_and_within_the_limits(make_client, redis_client):
    client = make_client()
    image = {"image": ("a.png", png(), "image/png")}
    resp = client.post("/v1/scores", data={"label": ["3", "4"]}, files=image)
    assert resp.status_code == 422 and "once" in resp.text
    resp = client.post("/v1/scores", data={"model": "m" * 5000}, files=image)
    assert resp.status_code == 422 and "at most 200" in resp.text and len(resp.content) < 2000
    assert client.post("/v1/scores", data={"label": "3"}, files=image).status_code in (200, 202)


@pytest.mark.parametrize("twice", ["image", "mask"])
def test_inpaint_refuses_a_second_image_or_mask(make_client, redis_client, twice):
    client = make_client()
    files = [("image", ("a.png", png(), "image/png")), ("mask", ("m.png", png(color=255), "image/png"))]
    files.append((twice, (f"{twice}2.png", png(color=200), "image/png")))
    resp = client.post("/v1/inpaint", files=files)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", twice] and "exactly one" in resp.text
    assert job_count(redis_client) == 0


# -- webhook URLs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url,says,not_says", [
    ("http://127.0.0.1:18253/a b", "spaces", None),
    ("http://127.0.0.1:0/hook", "port 0", "127.0.0.1:80"),
])
def test_webhook_urls_the_sender_cannot_use_are_refused(make_client, redis_client, url, says, not_says):
    client = make_client(webhook_secret=SECRET, webhook_allowed_hosts=("127.0.0.1",))
    resp = client.post("/v1/generations", json={"labels": [1], "webhook": url})
    assert resp.status_code == 422, resp.text
    assert says in resp.json()["message"]
    assert not_says is None or not_says not in resp.text
    assert job_count(redis_client) == 0
    ok = client.post("/v1/generations", json={"labels": [1], "webhook": "http://127.0.0.1:18253/a%20b"})
    assert ok.status_code == 202, ok.text


# -- keys: listings and worker addresses ----------------------------------------------------------

def test_an_admin_key_lists_every_job(make_client):
    client = make_client(api_keys=("key-a", "key-b"), admin_keys=("key-admin",))
    made = {}
    for key in ("key-a", "key-b"):
        resp = client.post("/v1/generations", json={"labels": [1]}, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 202, resp.text
        made[key] = resp.json()["id"]
    def listed(key: str) -> list[str]:
        return [j["id"] for j in client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).json()["jobs"]]
    assert listed("key-a") == [made["key-a"]]
    assert sorted(listed("key-admin")) == sorted(made.values())
    for job_id in made.values():                     # what it lists, it can read
        assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer key-admin"}).status_code == 200


def test_metrics_name_worker_addresses_only_for_a_request_with_a_key(make_client):
    client = make_client(api_keys=("key-a",))
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 200
    assert 'eqm_worker_metrics_up{worker="worker-' in anonymous.text        # the worker is there, unnamed
    assert WORKER_ADDRESS not in anonymous.text
    assert client.get("/metrics").text.count('eqm_worker_metrics_up{worker="worker-') == 1
    keyed = client.get("/metrics", headers={"Authorization": "Bearer key-a"})
    assert f'eqm_worker_metrics_up{{worker="{WORKER_ADDRESS}"}}' in keyed.text
    open_server = make_client()                                         # no keys: nothing to hide behind
    assert WORKER_ADDRESS in open_server.get("/metrics").text


# -- compositions ------------------------------------------------------------------------------------

def test_a_sum_composition_reports_no_guidance_scale(make_client):
    client = make_client()
    summed = client.post("/v1/compositions", json={"labels": [3, 8], "mode": "sum", "guidance_scale": 4.0}).json()
    guided = client.post("/v1/compositions", json={"labels": [3, 8], "guidance_scale": 4.0}).json()
    assert client.get(f"/v1/jobs/{summed['id']}").json()["guidance_scale"] is None
    assert client.get(f"/v1/jobs/{guided['id']}").json()["guidance_scale"] == 4.0
