"""The README's Deploy walk-through works as written where it can be run here: step 5's own
overlay (image and optional pull secret) renders and validates, and step 8's load script, run
against the real server, gets every prediction answered."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.api.helpers import ServerProcess
from tests.deploy.manifests import K8S, REPO, is_custom_resource, kubectl, one
from tests.model_factory import build_model

README = (REPO / "README.md").read_text()
DEPLOY = README[README.index("\n## Deploy"):README.index("\n## ", README.index("\n## Deploy") + 1)]
CODE_INDENT = " " * 7  # a code block inside a numbered list item


def step(number: int) -> str:
    start = DEPLOY.index(f"\n{number}. **")
    end = DEPLOY.find(f"\n{number + 1}. **", start)
    return DEPLOY[start:end if end != -1 else None]


def code_lines(text: str) -> list[str]:
    return [line[len(CODE_INDENT):] for line in text.splitlines() if line.startswith(CODE_INDENT)]


def without_cluster_commands(lines: list[str]) -> str:
    """The shell lines minus ``kubectl`` commands (and their continuation lines): no cluster here."""
    kept, skipping = [], False
    for line in lines:
        if line.startswith("kubectl "):
            skipping = True
        if not skipping:
            kept.append(line)
        if skipping and not line.endswith("\\"):
            skipping = False
    return "\n".join(kept) + "\n"


def test_readme_own_overlay_renders_your_image_and_pull_secret(tmp_path):
    script = without_cluster_commands(code_lines(step(5)))
    assert "deploy/prod/kustomization.yaml" in script
    (tmp_path / "k8s").symlink_to(K8S)  # the overlay sits beside k8s/ as in the repo
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, check=True, timeout=60)
    rendered = subprocess.run([kubectl(), "kustomize", str(tmp_path / "deploy" / "prod")], check=True,
                              capture_output=True, text=True, timeout=60).stdout
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "REGISTRY/btd:0.1.0-gpu"
    account = one(docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["imagePullSecrets"] == [{"name": "regcred"}]
    for doc in docs:
        if not is_custom_resource(doc):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_readme_load_pod_pulls_the_image_as_the_deployment_does():
    # Same image and ServiceAccount as the service's pods, so step 5's pull secret applies to it.
    lines = " ".join(code_lines(step(8))).replace("\\ ", " ")
    run = re.search(r"kubectl -n (\S+) run (.*?)--command", lines)
    assert run, "step 8 starts the load pod with kubectl run"
    overrides = json.loads(re.search(r"--overrides='([^']*)'", run.group(2)).group(1))
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    assert run.group(1) == "btd"
    assert overrides["spec"]["serviceAccountName"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert "--image=REGISTRY/btd:0.1.0-gpu" in run.group(2)
    # The NetworkPolicy admits only named clients: the load pod carries the label it names, and a key.
    policy = yaml.safe_load((K8S / "base" / "networkpolicy.yaml").read_text())
    named = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert "--labels=" + ",".join(f"{k}={v}" for k, v in named.items()) in run.group(2)
    assert '--env="BTD_API_KEY=$(cat load-test.key)"' in run.group(2)


def load_script() -> str:
    match = re.search(r"sh -s <<'SH'\n(.*?)\nSH\n", "\n".join(code_lines(step(8))) + "\n", re.DOTALL)
    assert match, "step 8 has no load script"
    return match.group(1)


def make_readme_keys(folder) -> None:
    """Step 6's key commands, as written (minus kubectl): the keys file and the load test's key."""
    script = without_cluster_commands(code_lines(step(6))).replace(".venv/bin/python", sys.executable)
    assert "app.transports.http.api_keys new" in script
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, check=True, timeout=60,
                   capture_output=True)


@pytest.mark.slow
def test_readme_load_script_gets_every_prediction_answered(tmp_path):
    script = load_script()
    assert "http://btd:8000" in script and "$(seq 300)" in script
    rounds = 2
    make_readme_keys(tmp_path)  # the service checks keys, as the deployed one does
    with ServerProcess(build_model(tmp_path / "model.onnx"), BTD_INTRA_OP_THREADS="1",
                       BTD_API_KEYS_FILE=str(tmp_path / "api-keys")) as server:
        script = (script.replace("http://btd:8000", server.url).replace("$(seq 300)", f"$(seq {rounds})")
                  .replace("/tmp/load", str(tmp_path / "load")))
        # The image's environment: its virtualenv first on PATH, the service code on PYTHONPATH, and
        # the key step 8's kubectl run passes in.
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               "PYTHONPATH": str(REPO), "BTD_API_KEY": (tmp_path / "load-test.key").read_text().strip()}
        done = subprocess.run(["sh", "-e", "-c", script], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        answered = sum(float(line.split()[1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
                       if line.startswith("btd_predictions_total{"))
    images = len(list((tmp_path / "load").glob("*.png")))
    assert images == 64 and answered == rounds * images
