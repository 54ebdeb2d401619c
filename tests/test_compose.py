"""The production files (docker-compose.yml, docker/*) hold together: checked by parsing, no Docker needed."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def cli_parser() -> argparse.ArgumentParser:
    """The `eqm` parser with the subcommands compose runs."""
    from service.cli import build_parser
    return build_parser()


def test_services_present(services):
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(services)


def test_redis_persists_and_never_evicts(services):
    redis = services["redis"]
    args = " ".join(map(str, redis["command"]))
    assert "--appendonly yes" in args and "--appendfsync everysec" in args
    assert "--maxmemory-policy noeviction" in args
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "ports" not in redis                       # not published outside the compose network


def test_api_service(services):
    api = services["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile" and (ROOT / api["build"]["dockerfile"]).is_file()
    assert "8000:8000" in api["ports"]
    assert api["environment"]["EQM_REDIS_URL"].startswith("redis://redis:")
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(v.endswith(":/weights:ro") for v in api["volumes"])
    args = cli_parser().parse_args(api["command"][1:])
    assert args.command == "api" and args.host == "0.0.0.0" and args.port == 8000


def test_worker_service_reserves_gpus(services):
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/weights:ro") for v in worker["volumes"])
    assert worker["environment"]["EQM_REDIS_URL"] == services["api"]["environment"]["EQM_REDIS_URL"]
    assert worker["environment"]["EQM_CHECKPOINT"] == services["api"]["environment"]["EQM_CHECKPOINT"]
    args = cli_parser().parse_args(worker["command"][1:])
    assert args.command == "worker" and args.metrics_port == 9400
    assert args.metrics_host == "0.0.0.0"          # workers bind loopback unless told: Prometheus is elsewhere
    # the worker registers http://<hostname>:<port>/metrics, which Prometheus must be able to resolve
    assert worker["hostname"] == "worker"


def test_environment_names_are_settings(services):
    from dataclasses import fields

    from service.settings import Settings
    known = {f"EQM_{f.name.upper()}" for f in fields(Settings)}
    for name, service in services.items():
        for var in service.get("environment", {}) or {}:
            if var.startswith("EQM_"):
                assert var in known, f"{name}: {var} is not a setting"


def test_prometheus_scrapes_api_and_workers(services):
    prom = services["prometheus"]
    config_mount = next(v for v in prom["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((ROOT / config_mount.split(":")[0]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["eqm-api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["eqm-api"].get("metrics_path", "/metrics") == "/metrics"
    sd_url = jobs["eqm-workers"]["http_sd_configs"][0]["url"]
    assert sd_url == "http://api:8000/sd/workers"
    from service.api import create_app
    from service.settings import Settings
    paths = set(create_app(Settings(redis_url="redis://unused:1/0")).openapi()["paths"])
    assert {"/metrics", "/sd/workers"} <= paths


def test_grafana_dashboard_uses_exported_metrics(services):
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "eqm.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((mounts["/var/lib/grafana/dashboards"] / "eqm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"\beqm_[a-z_]+", " ".join(exprs)))
    for wanted in ("eqm_steps_per_sample_bucket", "eqm_queue_depth", "eqm_job_latency_seconds_bucket"):
        assert wanted in used
    from service.api.metrics import ApiMetrics
    from service.metrics import Metrics
    exported = set()
    for registry in (Metrics().registry, ApiMetrics().registry):
        for family in registry.collect():
            exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count",
                         f"{family.name}_sum"}
    missing = used - exported
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"


def test_dockerfiles():
    api = dockerfile("Dockerfile")
    gpu = dockerfile("Dockerfile.gpu")
    assert api[0][0] == "FROM" and "python:3.11" in api[0][1]
    base = next(rest for word, rest in gpu if word == "ARG" and rest.startswith("BASE_IMAGE="))
    assert "cuda" in base and "pytorch" in base
    for instructions, command in ((api, ["eqm", "api"]), (gpu, ["eqm", "worker", "--metrics-port", "9400", "--metrics-host", "0.0.0.0"])):
        copied = {rest.split()[0] for word, rest in instructions if word == "COPY"}
        assert {"models", "kernels", "service", "pyproject.toml"} <= copied
        assert json.loads(next(rest for word, rest in instructions if word == "CMD")) == command
        assert any(word == "RUN" and "pip install ." in rest for word, rest in instructions)
        assert any(word == "USER" for word, _ in instructions)       # not root
    assert ("EXPOSE", "8000") in api and ("EXPOSE", "9400") in gpu
    torch_pin = next(rest for word, rest in api if word == "ARG" and rest.startswith("TORCH_VERSION="))
    assert torch_pin == "TORCH_VERSION=2.13.0"
    for name in ("Dockerfile", "Dockerfile.gpu"):
        ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        assert "*" in ignore and {"!models/", "!kernels/", "!service/", "!pyproject.toml"} <= set(ignore)


def test_compose_commands_are_shell_free(services):
    for name in ("api", "worker"):
        command = services[name]["command"]
        assert isinstance(command, list) and command[0] == "eqm", shlex.join(command)
