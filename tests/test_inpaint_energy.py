"""Through HTTP, against a real `eqm serve` with an EqM-E (dot) model of the digits architecture (random
weights): inpainting holds the known pixels exactly (/v1/inpaint and OpenAI's images.edit with a mask),
a mask of the wrong size is a 422, sum composition follows sum_k w_k c_k, and energies appear in the job
status, the image events, the PNG provenance, /v1/scores and /v1/models."""
from __future__ import annotations

import base64
import io
import json
import uuid

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clientstack import serve, stop
from models import load_model
from models.eqm.checkpoint import ModelSpec, save_safetensors
from models.codecs import IdentityCodec
from models.eqm.digits import DIGITS_DEFAULTS, digits_config, load_digits_split
from models.sampler import Condition, SamplerParams, noise_for_seed, sample
from service.embedded_redis import free_port
from service.images import read_provenance
from tinymodels import random_model

STEPS = 12


@pytest.fixture(scope="module")
def energy_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("eqme") / "digits-rand-e.safetensors"
    spec = ModelSpec(config=digits_config(), guidance_mode="all", codec="identity",
                     sampler_defaults=DIGITS_DEFAULTS.for_checkpoint(), energy_form="dot")
    save_safetensors(random_model(digits_config(), seed=3), spec, path)
    return path


@pytest.fixture(scope="module")
def server(redis_server, energy_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("inpaint") / "serve.log"
    proc = serve(redis_server.url, port, log, EQM_KEY_PREFIX=f"inp{uuid.uuid4().hex[:8]}",
                 EQM_CHECKPOINT=str(energy_model), EQM_WAIT_TIMEOUT_S="60")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


def _png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digit():
    split = load_digits_split()
    return IdentityCodec(1, 8).decode(split.x_test[:1])[0, ..., 0]


def _lower_half_mask() -> np.ndarray:
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[4:] = 255
    return mask


def _image(server, job_id, k=0) -> tuple[np.ndarray, bytes]:
    resp = httpx.get(f"{server}/v1/jobs/{job_id}/images/{k}")
    assert resp.status_code == 200
    return np.array(Image.open(io.BytesIO(resp.content))), resp.content


def test_inpaint_holds_known_pixels_and_reports_energy(server, digit):
    resp = httpx.post(f"{server}/v1/inpaint?wait=true", timeout=90,
                      files={"image": ("d.png", _png(digit)), "mask": ("m.png", _png(_lower_half_mask()))},
                      data={"label": "3", "n": "2", "seed": "0", "max_steps": str(STEPS)})
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["status"] == "done" and job["kind"] == "inpaint"
    for k in range(2):
        out, raw = _image(server, job["id"], k)
        assert np.array_equal(out[:4], digit[:4])               # the known half, exactly
        assert not np.array_equal(out[4:], digit[4:])           # the masked half was regenerated
        assert isinstance(job["images"][k]["energy"], float)
        assert read_provenance(raw)["energy"] == pytest.approx(job["images"][k]["energy"], rel=1e-5)
    assert job["images"][0]["energy"] != job["images"][1]["energy"]
    text = httpx.get(f"{server}/v1/jobs/{job['id']}/events", timeout=30).text
    images = [json.loads(line[6:]) for prev, line in zip(text.splitlines(), text.splitlines()[1:])
              if prev == "event: image" and line.startswith("data: ")]
    assert sorted(e["energy"] for e in images) == sorted(i["energy"] for i in job["images"])


def test_mask_that_does_not_fit_is_422(server, digit):
    resp = httpx.post(f"{server}/v1/inpaint", files={"image": ("d.png", _png(digit)),
                                                     "mask": ("m.png", _png(np.zeros((4, 4), np.uint8)))})
    assert resp.status_code == 422
    assert "the mask is 4x4 but the image is 8x8" in resp.json()["message"]
    empty = httpx.post(f"{server}/v1/inpaint", files={"image": ("d.png", _png(digit)),
                                                      "mask": ("m.png", _png(np.zeros((8, 8), np.uint8)))})
    assert empty.status_code == 422 and "marks nothing to regenerate" in empty.json()["message"]


def test_openai_edit_with_transparent_mask_inpaints(server, digit):
    openai = pytest.importorskip("openai")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[4:, :, 3] = 0                      # OpenAI's convention: the transparent pixels are edited
    client = openai.OpenAI(api_key="unused", base_url=f"{server}/v1", max_retries=0, timeout=90)
    result = client.images.edit(image=("d.png", _png(digit)), mask=("m.png", _png(rgba, "RGBA")), prompt="3",
                                extra_body={"seed": 1, "max_steps": STEPS})
    out = np.array(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
    assert np.array_equal(out[:4], digit[:4]) and not np.array_equal(out[4:], digit[4:])
    opaque = rgba.copy()
    opaque[..., 3] = 255
    with pytest.raises(openai.BadRequestError, match="marks nothing to regenerate"):
        client.images.edit(image=("d.png", _png(digit)), mask=("m.png", _png(opaque, "RGBA")), prompt="3")


def test_sum_composition_descends_the_sum_of_conditional_fields(server, energy_model):
    body = {"labels": [3, 8], "mode": "sum", "weights": [1.0, 0.5], "seed": 4, "max_steps": STEPS,
            "grad_norm_threshold": 0}
    resp = httpx.post(f"{server}/v1/compositions?wait=true", json=body, timeout=90)
    assert resp.status_code == 200, resp.text
    got, _ = _image(server, resp.json()["id"])
    guided = httpx.post(f"{server}/v1/compositions?wait=true", json={**body, "mode": "guided"}, timeout=90).json()
    loaded = load_model(energy_model)
    d = DIGITS_DEFAULTS.params
    params = SamplerParams(sampler=d.sampler, step_size=d.step_size, mu=d.mu, max_steps=STEPS)
    start = noise_for_seed(4, (1, 8, 8))[None]
    want = sample(loaded.field, start, [Condition((3, 8), (1.0, 0.5), mode="sum")], params, null_label=10,
                  guided_channels=1)
    pixels = IdentityCodec(1, 8).decode(want.latents)[0, ..., 0]
    assert np.abs(got.astype(int) - pixels.astype(int)).max() <= 1
    other, _ = _image(server, guided["id"])
    assert not np.array_equal(got, other)
    assert resp.json()["images"][0]["energy"] == pytest.approx(want.energies[0], rel=1e-3, abs=1e-3)


def test_scores_and_models_report_the_energy(server, digit, energy_model):
    models = httpx.get(f"{server}/v1/models").json()["models"][0]
    assert models["energy_form"] == "dot"
    noise = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    resp = httpx.post(f"{server}/v1/scores", files=[("image", ("a.png", _png(digit))), ("image", ("b.png", _png(noise)))],
                      timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["score"] == "energy" and [s["score"] for s in out["scores"]] == ["energy", "energy"]
    loaded = load_model(energy_model)
    x = torch.from_numpy(np.stack([digit, noise]).astype(np.float32) / 127.5 - 1.0)[:, None]
    want = loaded.field.energy(x, torch.full((2,), 10))
    np.testing.assert_allclose([s["energy"] for s in out["scores"]], want.numpy(), rtol=1e-4, atol=1e-4)


def _events(server, job_id, previews: bool) -> list[tuple[str, dict]]:
    url = f"{server}/v1/jobs/{job_id}/events" + ("?previews=true" if previews else "")
    out, event = [], None
    with httpx.stream("GET", url, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
                if event in ("done", "failed", "cancelled"):
                    break
    return out


def test_previews_only_when_asked(server):
    import threading
    body = {"labels": [5], "n": 2, "seed": 0, "max_steps": 1000, "grad_norm_threshold": 0, "step_size": 0.001}
    asked = httpx.post(f"{server}/v1/generations", json=body).json()["id"]
    plain = httpx.post(f"{server}/v1/generations", json=body).json()["id"]
    got: dict[str, list] = {}
    threads = [threading.Thread(target=lambda j=j, p=p: got.__setitem__(j, _events(server, j, p)))
               for j, p in ((asked, True), (plain, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    previews = [i["preview"] for e, d in got[asked] if e == "progress" for i in d["images"] if "preview" in i]
    assert previews, "no preview arrived for the client that asked"
    for url in previews[:5]:
        assert url.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert image.format == "PNG" and image.size == (8, 8)
    assert len(set(previews)) > 1                         # the images change as they form
    assert got[plain][-1][0] == "done" and got[asked][-1][0] == "done"
    assert not any("preview" in i for e, d in got[plain] if e == "progress" for i in d["images"])
    # The job's own stream without previews does not show them either, although another client asked.
    again = _events(server, asked, False)
    assert not any("preview" in i for e, d in again if e == "progress" for i in d["images"])
