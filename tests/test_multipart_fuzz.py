"""Fuzzing the multipart routes (``/v1/scores``, ``/v1/inpaint``, ``/v1/denoise``, ``/v1/images/edits``)
beyond their schema: hostile text in every field (huge decimal labels, 100 KB strings, control
characters, numbers in odd spellings), fields repeated, files where text belongs and text where files
belong, images that are not images. No answer may be a server error, and every refusal is JSON.

The schema-driven run over every operation (``test_e2e.test_fuzz_no_server_errors``) sends only what
the schema describes; these are the inputs a schema leaves out. In-process against a real Redis, with a
live worker's heartbeat so submissions are admitted (the jobs are never run).
"""
from __future__ import annotations

import io
import json
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.eqm.digits import CLASS_NAMES, digits_config
from models.eqm.network import EqM
from service.api import create_app
from service.settings import Settings

EXAMPLES = 80                 # per route


def _png(size=(8, 8), mode="L", color=128) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


ROUTES = {
    "/v1/scores": {"files": ["image"], "text": ["label", "model"]},
    "/v1/inpaint": {"files": ["image", "mask"], "text": ["label", "model", "n", "seed", "guidance_scale", "max_steps",
                                                          "sampler", "webhook", "format", "priority", "deadline_s"]},
    "/v1/denoise": {"files": ["image"], "text": ["label", "model", "n", "seed", "noise_level", "step_size", "format"]},
    "/v1/images/edits": {"files": ["image", "image[]", "mask"], "text": ["prompt", "n", "size", "response_format",
                                                                         "model", "seed", "noise_level"]},
}

hostile_text = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=190, max_value=6000).map(lambda n: "7" * n),          # long and huge decimals
    st.integers(min_value=4301, max_value=6000).map(lambda n: "1" + "0" * n),   # past int()'s digit limit
    st.sampled_from(["", " ", "0", "-1", "3", "1e309", "nan", "inf", "-0", "true", "null", "[3]", "3 + 8",
                     "\x00", "\t3\n", "３", "٣", "9" * 4301, "x" * 100_000, "digit 3", "http://127.0.0.1:1/a b"]),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)
file_body = st.one_of(st.sampled_from([_png(), _png((40, 30), "RGB"), _png(color=255), b"", b"GIF89a",
                                       b"\x89PNG\r\n\x1a\n" + b"\x00" * 64]),
                      st.binary(max_size=256))


@st.composite
def multipart(draw, route: str) -> tuple[list, list]:
    """(form data pairs, file parts) for one request to ``route``: some known fields, some repeated,
    some unknown, files and text swapped now and then."""
    spec = ROUTES[route]
    data: list[tuple[str, str]] = []
    files: list[tuple[str, tuple]] = []
    for name in draw(st.lists(st.sampled_from(spec["text"] + ["unknown", "image"]), max_size=5)):
        data.append((name, draw(hostile_text)))
    for name in draw(st.lists(st.sampled_from(spec["files"] + ["label"]), min_size=0, max_size=4)):
        files.append((name, ("f.png", draw(file_body), draw(st.sampled_from(["image/png", "text/plain", ""])))))
    return data, files


@pytest.fixture(scope="module")
def client(redis_server, tmp_path_factory):
    import redis
    path = tmp_path_factory.mktemp("models") / "digits.safetensors"
    config = digits_config()
    save_safetensors(EqM(config), ModelSpec(config, "all", "identity", CLASS_NAMES), path)
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.hset("eqm:workers", "w1", json.dumps({"device": "cpu", "model": "digits", "seen": time.time() + 3600}))
    settings_ = Settings(redis_url=redis_server.url, checkpoint=str(path), max_upload_bytes=50_000,
                         max_upload_pixels=1_000_000, wait_timeout_s=0.05, max_queue=100_000,
                         webhook_secret="whsec_" + "A" * 43 + "=", webhook_allowed_hosts=("127.0.0.1",))
    with TestClient(create_app(settings_), raise_server_exceptions=False) as c:
        yield c
    r.flushall()
    r.close()


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_no_multipart_input_gets_a_server_error(client, route):
    @given(request=multipart(route))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    def fuzz(request):
        pairs, files = request
        data: dict[str, list[str]] = {}
        for name, value in pairs:                          # a list per name: repeated fields stay repeated
            data.setdefault(name, []).append(value)
        resp = client.post(route, data=data or None, files=files or None)
        assert resp.status_code < 500, (resp.status_code, resp.text[:300], pairs[:3], [f[0] for f in files])
        if resp.status_code >= 400:
            assert resp.headers["content-type"].startswith("application/json"), resp.text[:200]
            assert len(resp.content) < 20_000                      # a refusal does not echo a 100 KB field

    fuzz()
