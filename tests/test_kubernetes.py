"""deploy/kubernetes, checked offline: every core object against the Kubernetes API schema
(kubernetes-validate), the KEDA ScaledObject against the fields KEDA's redis-streams scaler takes, and
the wiring between them (GPU per worker pod, the queue the scaler watches, what Prometheus scrapes)."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.jobstore import Keys
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"          # the oldest Kubernetes release the manifests are checked against

# The part of KEDA's ScaledObject (keda.sh/v1alpha1) these manifests use, from KEDA's documentation of
# ScaledObject and of the redis-streams scaler: metadata values are strings; lagCount needs Redis >= 7.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "redis-streams"},
                            "metadata": {
                                "type": "object", "required": ["stream", "consumerGroup", "lagCount"],
                                "additionalProperties": {"type": "string"},
                                "propertyNames": {"enum": ["address", "host", "port", "stream", "consumerGroup",
                                                           "lagCount", "activationLagCount", "databaseIndex",
                                                           "usernameFromEnv", "passwordFromEnv", "enableTLS"]},
                                "anyOf": [{"required": ["address"]}, {"required": ["host", "port"]}],
                            },
                        },
                    },
                },
            },
        },
    },
}


def rendered() -> list[dict]:
    """The kustomization's resources with its namespace and labels applied (what `kubectl kustomize` does
    for the features this kustomization uses)."""
    kust = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    labels = {k: v for entry in kust.get("labels", []) for k, v in entry["pairs"].items()}
    docs = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            if doc is None:
                continue
            meta = doc.setdefault("metadata", {})
            if doc["kind"] != "Namespace":
                meta["namespace"] = kust["namespace"]
            meta.setdefault("labels", {}).update(labels)
            docs.append(doc)
    return docs


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''}"
    return found


@pytest.fixture(scope="module")
def docs():
    return rendered()


def test_core_objects_match_the_kubernetes_schema(docs):
    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in core} >= {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment"}
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_catches_a_mistake(docs):
    worker = by_kind(docs, "Deployment", "eqm-worker")[0]
    broken = {**worker, "spec": {**worker["spec"], "replica": 2}}            # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_scaled_object_scales_the_workers_on_the_consumer_group_lag(docs):
    scaler = by_kind(docs, "ScaledObject")[0]
    jsonschema.validate(scaler, SCALED_OBJECT)
    spec = scaler["spec"]
    worker = by_kind(docs, "Deployment", spec["scaleTargetRef"]["name"])[0]
    assert worker["metadata"]["name"] == "eqm-worker" and spec["minReplicaCount"] <= spec["maxReplicaCount"]
    trigger = spec["triggers"][0]["metadata"]
    # The stream and group the workers of the served model really use (service.jobstore: "<prefix>:jobs:<model>",
    # group "<prefix>:workers"; a model is named by its checkpoint file's stem).
    config = by_kind(docs, "ConfigMap", "eqm-config")[0]["data"]
    prefix, model = config["EQM_KEY_PREFIX"], Path(config["EQM_CHECKPOINT"]).stem
    assert (trigger["stream"], trigger["consumerGroup"]) == (Keys(prefix).stream_for(model), f"{prefix}:workers")
    # The Redis it polls is the one the service talks to.
    host, port = trigger["address"].rsplit(":", 1)
    redis_svc = by_kind(docs, "Service", host.split(".")[0])[0]
    assert host.split(".")[1] == redis_svc["metadata"]["namespace"]
    assert int(port) in [p["port"] for p in redis_svc["spec"]["ports"]]
    assert config["EQM_REDIS_URL"].startswith(f"redis://{redis_svc['metadata']['name']}:{port}/")
    redis_image = by_kind(docs, "StatefulSet", "redis")[0]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert int(redis_image.split(":")[1].split(".")[0]) >= 7, "lagCount needs Redis >= 7"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaler, "spec": {**spec, "triggers": [{"type": "redis-streams", "metadata": {
            "address": "redis:6379", "stream": "eqm:jobs", "consumerGroup": "eqm:workers", "lagCount": 32}}]}},
            SCALED_OBJECT)                                                     # not a string


def test_one_gpu_per_worker_pod_and_prometheus_scrapes_each(docs):
    pod = by_kind(docs, "Deployment", "eqm-worker")[0]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    cmd = container["command"]
    assert cmd[:2] == ["eqm", "worker"] and cmd[cmd.index("--devices") + 1] == "cuda:0"
    metrics_port = int(cmd[cmd.index("--metrics-port") + 1])
    # The worker registers http://<metrics host>:<port>/metrics for /sd/workers: the pod's own IP.
    assert cmd[cmd.index("--metrics-host") + 1] == "$(POD_IP)"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == metrics_port
    assert metrics_port in [p["containerPort"] for p in container["ports"]]
    api = by_kind(docs, "Deployment", "eqm-api")[0]["spec"]["template"]
    assert api["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for deployment in (pod, api):
        assert deployment["spec"]["securityContext"]["runAsNonRoot"] is True


def test_config_names_only_real_settings(docs):
    fields = {f"EQM_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    config = by_kind(docs, "ConfigMap", "eqm-config")[0]["data"]
    assert set(config) <= fields, f"unknown settings: {sorted(set(config) - fields)}"


def test_prometheus_config_is_valid(docs, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    config = by_kind(docs, "ConfigMap", "prometheus-config")[0]["data"]["prometheus.yml"]
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    proc = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    workers = next(j for j in yaml.safe_load(config)["scrape_configs"] if j["job_name"] == "eqm-workers")
    api_port = by_kind(docs, "Service", "api")[0]["spec"]["ports"][0]["port"]
    assert workers["http_sd_configs"][0]["url"] == f"http://api:{api_port}/sd/workers"


def test_kubectl_renders_the_same_objects(docs):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the Python rendering above is what is checked")
    proc = subprocess.run([kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    theirs = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
              for d in yaml.safe_load_all(proc.stdout) if d}
    assert theirs == {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs}
