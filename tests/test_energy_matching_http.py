"""The bundled Energy Matching model through a real `eqm serve`: listing, generation (same pixels as the
offline integrator), the event stream, the OpenAI route and unconditional-model errors."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import clientstack
from models import resolve_checkpoint
from models import load_model
from models.codecs import IdentityCodec
from heun_reference import sample_heun
from models.heun_sde import HeunSDEParams
from models.sampler import noise_for_seed
from service.images import read_provenance

PORT = 8947


@pytest.fixture(scope="module")
def base(redis_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("em-serve") / "serve.log"
    env = clientstack.service_env(EQM_REDIS_URL=redis_server.url, EQM_CHECKPOINT="em-digits", EQM_HEARTBEAT_S="0.5")
    proc = clientstack.start(["serve", "--port", str(PORT), "--device", "cpu", "--threads", "1",
                              "--log-level", "warning"], env, log)
    try:
        clientstack.wait_ready(f"http://127.0.0.1:{PORT}/readyz", proc, log)
        yield f"http://127.0.0.1:{PORT}"
    finally:
        clientstack.stop(proc)


def test_models_lists_an_unconditional_model_with_the_heun_sampler(base):
    (m,) = httpx.get(f"{base}/v1/models").json()["models"]
    assert m["name"] == "em-digits" and m["num_classes"] == 0 and m["class_names"] == []
    assert m["defaults"]["sampler"] == "heun-sde" and m["image_size"] == 8 and m["channels"] == 1
    assert m["energy_form"] == "potential"


def test_generation_gives_the_offline_integrators_pixels(base):
    body = {"n": 2, "seed": 11, "max_steps": 30, "step_size": 0.02, "epsilon_max": 0.02, "time_cutoff": 0.5}
    job = httpx.post(f"{base}/v1/generations", json=body, headers={"Prefer": "wait=60"}, timeout=90).json()
    assert job["status"] == "done", job
    assert job["sampler"]["sampler"] == "heun-sde" and job["sampler"]["epsilon_max"] == 0.02
    field = load_model(resolve_checkpoint("em-digits")).field
    field_params = HeunSDEParams(dt=0.02, max_steps=30, epsilon_max=0.02, time_cutoff=0.5)
    start = torch.stack([noise_for_seed(s, (1, 8, 8)) for s in (11, 12)])
    zeros = lambda x: torch.zeros(len(x), dtype=torch.long)     # noqa: E731  (the potential has no labels)
    want = sample_heun(lambda x: field.direction(x, zeros(x)), start, field_params, [11, 12],
                       energy=lambda x: field.energy(x, zeros(x)))
    pixels = IdentityCodec(1, 8).decode(want.latents)[..., 0].astype(int)
    for i, image in enumerate(job["images"]):
        assert image["steps"] == 30 and image["labels"] == []
        data = httpx.get(image["url"]).content
        got = np.array(Image.open(io.BytesIO(data)), dtype=int)
        assert np.abs(got - pixels[i]).max() <= 1
        rec = read_provenance(data)
        assert rec["sampler"] == "heun-sde" and rec["epsilon_max"] == 0.02 and rec["time_cutoff"] == 0.5
        # V of the final image: in the status and in the PNG's record.
        assert image["energy"] == pytest.approx(want.energies[i], rel=1e-4, abs=1e-4)
        assert rec["energy"] == pytest.approx(want.energies[i], rel=1e-4, abs=1e-4)


def test_event_stream_reports_the_job_to_its_end(base):
    resp = httpx.post(f"{base}/v1/generations", json={"n": 2, "seed": 3, "max_steps": 150, "step_size": 0.01})
    assert resp.status_code == 202, resp.text
    names, finals = [], []
    with httpx.stream("GET", resp.json()["links"]["events"], timeout=120) as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
                names.append(event)
            elif line.startswith("data: ") and event == "image":
                finals.append(json.loads(line[6:]))
    assert names[0] == "queued" and "started" in names and names[-1] == "done"
    assert len(finals) == 2 and all(f["steps"] == 150 for f in finals)
    assert all(isinstance(f["energy"], float) for f in finals)          # V of each final image


def test_openai_route_takes_any_prompt_for_an_unconditional_model(base):
    resp = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a digit", "n": 1, "seed": 1,
                                                                "max_steps": 20}, timeout=90)
    assert resp.status_code == 200, resp.text
    (item,) = resp.json()["data"]
    assert item["revised_prompt"] == "unconditional"
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (8, 8)


def test_labels_are_refused_with_one_line(base):
    resp = httpx.post(f"{base}/v1/generations", json={"labels": [3], "n": 1})
    assert resp.status_code == 422
    assert "unconditional" in resp.json()["message"] and "\n" not in resp.json()["message"]
