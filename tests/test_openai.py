"""The official `openai` package against a real `eqm serve` (CPU worker, bundled digits model)."""
from __future__ import annotations

import base64
import io
import uuid

import httpx
import pytest
from PIL import Image

from clientstack import serve, stop
from models import resolve_checkpoint
from service.embedded_redis import free_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(), reason="the bundled digits model is missing")
API_KEY = "openai-test-key"


@pytest.fixture(scope="module")
def server(redis_server, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("openai") / "serve.log"
    proc = serve(redis_server.url, port, log, EQM_KEY_PREFIX=f"oai{uuid.uuid4().hex[:8]}", EQM_API_KEYS=API_KEY,
                 EQM_MAX_IMAGES_PER_JOB="4", EQM_WAIT_TIMEOUT_S="60")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=f"{server}/v1", max_retries=0, timeout=90)


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_generate_b64_and_url(client, server):
    result = client.images.generate(model="digits", prompt="7", n=2, size="8x8", response_format="b64_json",
                                    extra_body={"seed": 0, "max_steps": 30})
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        image = _decode(item.b64_json)
        assert image.size == (8, 8) and image.format == "PNG"
        assert "class 7" in item.revised_prompt
    by_url = client.images.generate(prompt="3 + 8", response_format="url", extra_body={"seed": 1, "max_steps": 30})
    (item,) = by_url.data
    assert item.url.startswith(server + "/v1/jobs/") and "class 3" in item.revised_prompt and "class 8" in item.revised_prompt
    resp = httpx.get(item.url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert resp.status_code == 200 and Image.open(io.BytesIO(resp.content)).size == (8, 8)


def test_same_seed_same_image(client):
    a = client.images.generate(prompt="2", extra_body={"seed": 5, "max_steps": 20})
    b = client.images.generate(prompt="2", extra_body={"seed": 5, "max_steps": 20})
    assert base64.b64decode(a.data[0].b64_json) == base64.b64decode(b.data[0].b64_json)


def test_edit_denoises_an_upload(client):
    image = Image.new("L", (32, 32), 0)
    image.paste(255, (14, 4, 18, 28))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    result = client.images.edit(image=("one.png", buf.getvalue(), "image/png"), prompt="1", n=2,
                                extra_body={"noise_level": 0.5, "max_steps": 20, "seed": 0})
    assert len(result.data) == 2
    assert all(_decode(d.b64_json).size == (8, 8) for d in result.data)


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt="7", size="1024x1024")
    assert "8x8" in bad_size.value.body["message"] and bad_size.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as bad_class:
        client.images.generate(prompt="seven hundred")
    assert bad_class.value.body["param"].startswith("prompt") and bad_class.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="7", n=5)              # over EQM_MAX_IMAGES_PER_JOB
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(api_key="wrong", base_url=f"{server}/v1", max_retries=0).images.generate(prompt="7")
    assert unauthorized.value.body["type"] == "authentication_error"
    resp = httpx.post(f"{server}/v1/images/edits", headers={"Authorization": f"Bearer {API_KEY}"},
                      data={"prompt": "1"}, files={"image": ("a.txt", b"not an image", "text/plain")})
    assert resp.status_code == 415 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_body_without_content_type_gets_the_header_hint(server):
    """A JSON body sent without its Content-Type: OpenAI's error shape, saying which header to send."""
    resp = httpx.post(f"{server}/v1/images/generations", content=b'{"prompt": "3"}',
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"] == ("body: expected a JSON object; send it with the header "
                                               "'Content-Type: application/json'")
    resp = httpx.post(f"{server}/v1/images/generations", json={"prompt": "3", "steps": 30},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "steps"
    assert "did you mean 'max_steps'?" in resp.json()["error"]["message"], resp.json()
