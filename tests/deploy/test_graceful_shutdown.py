"""A rolling update or scale-down loses no request: the real server (``python -m app``), configured
with the CPU overlay's settings, gets SIGTERM while many requests are in flight. Every request
gets its 200, new connections are refused once the signal lands, and the process exits 0 before
Kubernetes would kill it (terminationGracePeriodSeconds minus the preStop sleep)."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from app.transports.http.api_keys import key_line, new_key
from tests.api.helpers import ServerProcess, png_bytes
from tests.deploy.manifests import container_env, one, render
from tests.model_factory import build_model

pytestmark = pytest.mark.slow

REQUESTS = 16
REFUSAL_WAIT_S = 10.0


def overlay_shutdown_settings(overlay: str) -> tuple[dict[str, str], float]:
    """The overlay's BTD_* settings and the seconds the pod has between SIGTERM and SIGKILL."""
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {k: v for k, v in container_env(docs, container).items()
           if k.startswith("BTD_") and k != "BTD_TRT_ENGINE_CACHE_DIR"}
    return env, pod["terminationGracePeriodSeconds"] - container["lifecycle"]["preStop"]["sleep"]["seconds"]


def in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("btd_in_flight_requests "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no btd_in_flight_requests")


def test_sigterm_mid_flight_loses_no_request_and_exits_within_grace(tmp_path):
    env, sigterm_to_sigkill_s = overlay_shutdown_settings("cpu")
    # Requests wait in the micro-batcher for company (one batch holds them all), so all are in
    # flight when the signal lands.
    env.update(BTD_MAX_BATCH_SIZE=str(2 * REQUESTS), BTD_MAX_WAIT_MS="1000", BTD_INTRA_OP_THREADS="1",
               BTD_LOG_LEVEL="info")
    # The overlay reads its API keys from the Secret mounted at BTD_API_KEYS_FILE: here, a file of our own.
    key = new_key()
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(key_line("shutdown-test", key) + "\n")
    assert env["BTD_API_KEYS_FILE"]
    env["BTD_API_KEYS_FILE"] = str(keys_file)
    model = build_model(tmp_path / "model.onnx")
    images = [png_bytes(seed=i) for i in range(REQUESTS)]
    statuses: dict[int, int | str] = {}
    start = threading.Barrier(REQUESTS)

    def post(i: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            start.wait(30)  # all clients made first, so the requests go out together
            try:
                response = client.post("/v1/predict", content=images[i],
                                       headers={"Content-Type": "image/png", "X-API-Key": key})
                statuses[i] = response.status_code
            except httpx.HTTPError as exc:  # a lost request
                statuses[i] = type(exc).__name__

    with ServerProcess(model, **env) as server:
        threads = [threading.Thread(target=post, args=(i, server.url)) for i in range(REQUESTS)]
        for thread in threads:
            thread.start()
        # Signal once every request has arrived (in flight, or in the rare slow case already answered).
        deadline = time.monotonic() + 30
        while (pending := in_flight(server.url)) + len(statuses) < REQUESTS:
            assert time.monotonic() < deadline, "the requests never arrived"
            time.sleep(0.02)
        assert pending > 0, "every request finished before the signal: nothing was in flight"

        server.proc.terminate()  # SIGTERM, as the kubelet sends after preStop
        signalled = time.monotonic()
        refused = False
        while not refused and time.monotonic() - signalled < REFUSAL_WAIT_S:
            try:
                httpx.get(server.url + "/livez", timeout=1)
                time.sleep(0.05)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                # Refused outright, or a connection the kernel had queued on the listening socket
                # just before uvicorn closed it, dropped unanswered: either way not served.
                refused = True
        for thread in threads:
            thread.join(60)
        try:
            code = server.proc.wait(timeout=sigterm_to_sigkill_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {sigterm_to_sigkill_s} s after SIGTERM: Kubernetes would SIGKILL it")
        log = server.log()

    assert statuses == {i: 200 for i in range(REQUESTS)}, log[-3000:]  # none lost
    assert refused, "new connections were still accepted after SIGTERM"
    assert code == 0, log[-3000:]
