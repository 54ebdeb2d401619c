"""`eqm serve --checkpoint digits --checkpoint digits-e --checkpoint em-digits`: three models behind one API,
one worker process holding all three, each request answered by the model it names (real processes)."""
from __future__ import annotations

import base64
import io
import json
import signal

import httpx
import pytest
from PIL import Image

from service.embedded_redis import free_port
from tests.clientstack import stop
from tests.test_serve import _serve, _wait_port, needs_digits

MODELS = ("digits", "digits-e", "em-digits")


@pytest.fixture(scope="module")
def served_three(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-models") / "serve.log"
    flags = [arg for m in MODELS for arg in ("--checkpoint", m)]
    proc = _serve([*flags, "--port", str(port), "--device", "cpu"], log, EQM_HEARTBEAT_S="0.5")
    try:
        _wait_port(port, proc, log)
        yield f"http://127.0.0.1:{port}", log
    finally:
        code = stop(proc, signal.SIGINT)
        assert code == 0, log.read_text()[-3000:]


def _provenance(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).text["eqm-parameters"])


@needs_digits
def test_each_request_is_answered_by_the_model_it_names(served_three):
    base, log = served_three
    with httpx.Client(base_url=base, timeout=120) as c:
        cards = c.get("/v1/models").json()["models"]
        assert [m["name"] for m in cards] == list(MODELS) and cards[0]["default"]
        assert all(m["workers"] == 1 and m["loaded"] for m in cards), cards
        for model in MODELS:
            body = {"model": model, "n": 1, "seed": 3, "max_steps": 8}
            if model != "em-digits":
                body["labels"] = [4]
            job = c.post("/v1/generations?wait=true", json=body)
            assert job.status_code == 200, job.text
            out = job.json()
            assert out["status"] == "done" and out["model"] == model
            energy = out["images"][0]["energy"]
            assert (energy is not None) == (model != "digits"), (model, out["images"][0])
            png = c.get(out["images"][0]["url"]).content
            assert _provenance(png)["model"] == model
            oa = c.post("/v1/images/generations", json={"model": model, "prompt": "4", "n": 1, "max_steps": 8})
            assert oa.status_code == 200, oa.text
            assert _provenance(base64.b64decode(oa.json()["data"][0]["b64_json"]))["model"] == model
        default = c.post("/v1/generations?wait=true", json={"labels": [1], "max_steps": 4}).json()
        assert default["model"] == "digits"
        unknown = c.post("/v1/generations", json={"model": "EqM-XL/2"})
        assert unknown.status_code == 404 and all(repr(m) in unknown.json()["detail"] for m in MODELS)
        oa = c.post("/v1/images/generations", json={"model": "dall-e-3", "prompt": "4"})
        assert oa.status_code == 404 and oa.json()["error"]["code"] == "model_not_found"
