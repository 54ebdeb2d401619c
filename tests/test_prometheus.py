"""What Prometheus sees: bounded labels, series that exist before their first increment, one source per
series, and the shipped dashboard and config checked against a live `eqm serve` and Debian's Prometheus."""
from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from clientstack import serve, stop
from models import resolve_checkpoint
from service.api import create_app
from service.embedded_redis import free_port
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
needs_digits = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(), reason="the bundled digits model is missing")


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `apt-get install prometheus` (Debian) brings prometheus and promtool")
    return path


@pytest.fixture
def client(redis_url):
    with TestClient(create_app(Settings(redis_url=redis_url))) as c:
        yield c


def test_the_method_label_is_bounded(client):
    """A made-up method is counted as "other": a client cannot grow the set of series."""
    for method in ("XYZ1", "XYZ2", "BREW"):
        client.request(method, "/healthz")
    text = client.get("/metrics").text
    methods = {s.labels["method"] for s in _families(text)["eqm_api_requests"].samples}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert _value(text, "eqm_api_requests_total", method="other", route="/healthz") == 3


def test_known_series_exist_at_zero_and_no_created_series(client):
    """Refusals and submissions of every kind are on the page before the first one (at 0), so the first
    one shows in increase(); and there is no ``*_created`` series beside each counter."""
    text = client.get("/metrics").text
    for reason in ("queue_full", "no_worker", "redis_down", "redis_full", "busy"):
        assert _value(text, "eqm_api_rejected_total", reason=reason) == 0, reason
    for kind in ("generate", "compose", "denoise", "score"):
        assert _value(text, "eqm_api_jobs_submitted_total", kind=kind) == 0, kind
    assert "_created" not in text


def test_metrics_are_gzipped_when_asked(client):
    resp = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert resp.headers["content-encoding"] == "gzip"
    assert "eqm_queue_depth" in resp.text                         # httpx undid the encoding
    raw = client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers and "eqm_queue_depth" in raw.text


def test_discovery_has_no_label_the_series_carry_and_lists_only_unmerged_workers(redis_url, redis_client):
    """``/sd/workers`` labels never clash with the series' own (Prometheus would rename ``model`` to
    ``exported_model``), and it lists the workers only when the API page does not include them."""
    redis_client.hset("eqm:workers", "host:123:cpu", json.dumps(
        {"device": "cpu", "model": "digits", "seen": time.time(), "metrics_url": "http://worker-host:9400/metrics"}))
    # A process holding two models registers once per model, on one endpoint: one target naming both.
    for model in ("digits-e", "em-digits"):
        redis_client.hset("eqm:workers", f"other:7:cpu:{model}", json.dumps(
            {"device": "cpu", "model": model, "models": [model], "seen": time.time(),
             "metrics_url": "http://other-host:9401/metrics"}))
    with TestClient(create_app(Settings(redis_url=redis_url, metrics_from_workers=False))) as c:
        assert c.get("/sd/workers").json() == [
            {"targets": ["worker-host:9400"], "labels": {"worker": "worker-host:9400", "device": "cpu",
                                                        "models": "digits"}},
            {"targets": ["other-host:9401"], "labels": {"worker": "other-host:9401", "device": "cpu",
                                                       "models": "digits-e,em-digits"}}]
    with TestClient(create_app(Settings(redis_url=redis_url))) as c:
        assert c.get("/sd/workers").json() == []


@pytest.fixture(scope="module")
def served(redis_server, tmp_path_factory):
    port, metrics_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("prom") / "serve.log"
    proc = serve(redis_server.url, port, log, EQM_KEY_PREFIX=f"prom{uuid.uuid4().hex[:6]}",
                 EQM_METRICS_PORT=str(metrics_port))
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    """Debian's Prometheus with the shipped config, its targets pointed at the served API (1 s scrapes)."""
    binary = _tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    host = served.split("//")[1]
    config = (ROOT / "docker" / "prometheus.yml").read_text().replace("api:8000", host)
    config = config.replace("scrape_interval: 5s", "scrape_interval: 1s").replace("refresh_interval: 15s",
                                                                                   "refresh_interval: 1s")
    (folder / "prometheus.yml").write_text(config)
    shutil.copy(ROOT / "docker" / "prometheus-api-key", folder / "prometheus-api-key")    # empty: no keys here
    port = free_port()
    with open(folder / "prometheus.log", "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("prometheus did not start:\n" + (folder / "prometheus.log").read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _query(prometheus: str, expr: str) -> list:
    resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", resp
    return resp["data"]["result"]


@needs_digits
def test_a_real_prometheus_sees_the_first_images_once(served, prometheus):
    """Two composed images on a fresh server: ``increase()`` over the window counts both (the series
    existed at 0 before), and every worker series is counted once (the shipped config scrapes the API,
    whose page already includes the workers, and discovers no worker to scrape again)."""
    end = time.monotonic() + 30
    while not _query(prometheus, 'eqm_images_total{task="compose"}'):     # a scrape before the images
        assert time.monotonic() < end, "Prometheus never scraped the pre-created series"
        time.sleep(0.5)
    resp = httpx.post(f"{served}/v1/compositions?wait=true", json={"labels": [1, 7], "n": 2, "max_steps": 5},
                      timeout=60)
    assert resp.status_code == 200 and resp.json()["status"] == "done", resp.text
    end = time.monotonic() + 30
    while True:
        total = _query(prometheus, 'sum(increase(eqm_images_total{task="compose"}[5m]))')
        if total and float(total[0]["value"][1]) >= 1.5:
            break
        assert time.monotonic() < end, f"increase() never saw the images: {total}"
        time.sleep(0.5)
    assert float(_query(prometheus, 'sum(eqm_images_total{task="compose"})')[0]["value"][1]) == 2   # not 4
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert [t["labels"]["job"] for t in targets] == ["eqm-api"] and targets[0]["health"] == "up"
    assert not _query(prometheus, '{exported_model!=""}')
    # Discovery itself worked (with the shipped, empty key file): it found nothing to scrape twice.
    own = httpx.get(f"{prometheus}/metrics", timeout=10).text
    assert _value(own, "prometheus_sd_http_failures_total") == 0
    assert (_value(own, "prometheus_sd_discovered_targets", config="eqm-workers") or 0) == 0


@needs_digits
def test_dashboard_metric_names_are_on_the_live_page(served):
    """Every ``eqm_*`` name a dashboard query uses is on the live ``/metrics`` of `eqm serve`."""
    text = httpx.get(f"{served}/metrics", timeout=10).text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    used = set()
    for dashboard in (ROOT / "docker" / "grafana").rglob("*.json"):
        for expr in re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', dashboard.read_text()):
            used |= set(re.findall(r"\beqm_[a-z0-9_]+", json.loads(f'"{expr}"')))
    assert len(used) >= 10
    assert sorted(used - names) == []


def test_the_shipped_prometheus_config_is_valid():
    promtool = _tool("promtool")
    proc = subprocess.run([promtool, "check", "config", str(ROOT / "docker" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_digits
def test_the_live_page_passes_promtool(served):
    promtool = _tool("promtool")
    text = httpx.get(f"{served}/metrics", timeout=10).text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
