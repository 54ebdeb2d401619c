"""A client generated from the served schema by a real generator (openapi-python-client) works: it
submits a job, waits for it, downloads an image as a typed file and reads a 422 as a typed error."""
from __future__ import annotations

import importlib
import io
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from clientstack import serve, stop
from models import resolve_checkpoint
from service.embedded_redis import free_port

pytestmark = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(), reason="the bundled digits model is missing")
PACKAGE = "eq_m_inference_service_client"


@pytest.fixture(scope="module")
def generated(redis_server, tmp_path_factory):
    """(base URL of a live `eqm serve`, the client package generated from its /openapi.json)."""
    generator = Path(sys.executable).with_name("openapi-python-client")       # the test extra installs it
    if not generator.is_file():
        pytest.fail("openapi-python-client is not installed: `pip install -e .[test]` brings it")
    folder = tmp_path_factory.mktemp("generated")
    port = free_port()
    proc = serve(redis_server.url, port, folder / "serve.log", EQM_KEY_PREFIX=f"gen{uuid.uuid4().hex[:6]}")
    base = f"http://127.0.0.1:{port}"
    try:
        (folder / "openapi.json").write_bytes(httpx.get(f"{base}/openapi.json", timeout=10).content)
        out = subprocess.run([str(generator), "generate", "--path", str(folder / "openapi.json"), "--meta", "none",
                              "--output-path", str(folder / PACKAGE)], capture_output=True, text=True, timeout=300,
                             cwd=folder)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Warning" not in out.stdout + out.stderr, out.stdout + out.stderr    # every operation generated
        sys.path.insert(0, str(folder))
        yield base, importlib.import_module(PACKAGE)
    finally:
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
        stop(proc)


def test_the_generated_client_submits_waits_downloads_and_reads_a_422(generated):
    base, package = generated
    from eq_m_inference_service_client.api.jobs import create_generation, get_image, get_job
    from eq_m_inference_service_client.client import Client
    from eq_m_inference_service_client.models import GenerationRequest, JobCreated, JobStatus, ValidationErrorResponse
    from eq_m_inference_service_client.types import File

    client = Client(base_url=base, timeout=httpx.Timeout(60))
    created = create_generation.sync(client=client, body=GenerationRequest(labels=[3], n=2, max_steps=5, seed=1))
    assert isinstance(created, JobCreated), created
    end = time.monotonic() + 60
    while True:
        status = get_job.sync(client=client, job_id=created.id)
        assert isinstance(status, JobStatus), status
        if status.status == "done":
            break
        assert time.monotonic() < end, f"the job is still {status.status}"
        time.sleep(0.2)
    image = get_image.sync(client=client, job_id=created.id, index=1)
    assert isinstance(image, File)
    picture = Image.open(io.BytesIO(image.payload.read()))
    assert picture.format == "PNG" and picture.size == (8, 8)

    refused = create_generation.sync_detailed(client=client, body=GenerationRequest(labels=[3], n=0))
    assert refused.status_code == 422
    assert isinstance(refused.parsed, ValidationErrorResponse)
    assert refused.parsed.detail[0].loc[-1] == "n" and refused.parsed.message


def test_every_operation_and_body_has_a_name_a_client_exposes(generated):
    """Operation ids are the handlers' names (one function per operation), bodies have model names."""
    base, _ = generated
    schema = httpx.get(f"{base}/openapi.json", timeout=10).json()
    ids = [op["operationId"] for ops in schema["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) and all(i.isidentifier() and "_v1_" not in i and not i.endswith(("_get", "_post"))
                                             for i in ids), ids
    assert not [name for name in schema["components"]["schemas"] if name.startswith("Body_")]
    ops = schema["paths"]
    assert "422" not in ops["/v1/images/generations"]["post"]["responses"]        # it answers 400, OpenAI's shape
    assert {"408", "507"} <= set(ops["/v1/generations"]["post"]["responses"])
    assert {"408"} <= set(ops["/v1/images/edits"]["post"]["responses"])
    assert "security" not in ops["/v1/generations"]["post"]                      # no keys on this server
    assert ops["/sd/workers"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "array"
