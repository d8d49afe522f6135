"""Build the CPU image from a Debian 12 base made here (base images cannot be pulled in CI) and run
it the way the Kubernetes manifests do: non-root, read-only root filesystem, no capabilities, no
network. The image's own HEALTHCHECK decides readiness; a prediction runs inside the container;
SIGTERM stops it with exit status 0.

Needs root, podman and debootstrap (scripts/test.sh installs them) and the Debian and PyPI
registries for the build; the README ("Build the image") says how long it took when last measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from tests.deploy.manifests import REPO
from tests.model_factory import LABELS, build_model

pytestmark = pytest.mark.slow

# The runc here may not raise rlimits beyond the session's: keep them at values any process may set.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
PREDICT_INSIDE = """
import json, urllib.request, cv2, numpy as np
png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (96, 128), dtype=np.uint8))[1].tobytes()
request = urllib.request.Request("http://127.0.0.1:8000/v1/predict", data=png, headers={"Content-Type": "image/png"})
print(json.dumps(json.load(urllib.request.urlopen(request, timeout=30))))
"""


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def image(tmp_path):
    missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        reason = f"needs root and {', '.join(missing) or 'podman, debootstrap'} (scripts/test.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    model = build_model(tmp_path / "model.onnx")
    tag = f"localhost/btd-test:{uuid.uuid4().hex[:12]}"
    build = subprocess.run(["bash", "scripts/build-image.sh", "--local-base", "--model", str(model), "--tag", tag],
                           cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    try:
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)
        podman("image", "prune", "--force", check=False)  # the build's dangling intermediate layers


def test_image_serves_hardened_offline_and_stops_cleanly_on_sigterm(image):
    name = f"btd-test-{uuid.uuid4().hex[:12]}"
    podman("run", "--detach", "--name", name, *ULIMITS, "--network", "none", "--read-only",
           "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/var/cache/btd:rw,mode=1777",
           "--tmpfs", "/var/lib/btd:rw,mode=1777",
           "--cap-drop", "ALL", "--security-opt", "no-new-privileges", image)
    try:
        deadline = time.monotonic() + 90
        while podman("healthcheck", "run", name, check=False).returncode != 0:  # the image's HEALTHCHECK
            assert time.monotonic() < deadline, podman("logs", name).stdout[-4000:]
            assert podman("inspect", name, "--format", "{{.State.Running}}").stdout.strip() == "true", \
                podman("logs", name, check=False).stderr[-4000:]
            time.sleep(1)

        result = json.loads(podman("exec", name, "python", "-c", PREDICT_INSIDE).stdout)
        assert result["label"] in LABELS and abs(sum(result["probabilities"].values()) - 1) < 1e-4

        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert podman("exec", name, "touch", "/srv/btd/x", check=False).returncode != 0  # read-only root

        podman("stop", "--time", "30", name, timeout=60)
        assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
    finally:
        podman("rm", "--force", name, check=False)
