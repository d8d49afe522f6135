"""End to end: ``python -m app`` serving a model directory swaps to a new version on SIGHUP while 16
clients keep sending images; none of their requests fails and /readyz stays green."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import ServerProcess, png_bytes
from tests.api.test_api_model_updates import point_current
from tests.model_factory import build_model

pytestmark = pytest.mark.slow

CLIENTS = 16


def test_sighup_swaps_the_model_of_a_running_server_without_a_failed_request(tmp_path: Path):
    models = tmp_path / "models"
    build_model(models / "btd-1.onnx", version="1.0.0-test", seed=1)
    build_model(models / "btd-2.onnx", version="2.0.0-test", seed=2)
    point_current(models, "btd-1.onnx")
    image = png_bytes((120, 140), seed=5)
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()
    with ServerProcess(models, BTD_RECORDS="false", BTD_AUDIT_LOG="off") as server:
        def hammer() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    response = client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        versions.add(response.json()["model"]["version"])

        with ThreadPoolExecutor(CLIENTS) as pool:
            for _ in range(CLIENTS):
                pool.submit(hammer)
            time.sleep(1.0)
            point_current(models, "btd-2.onnx")
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "2.0.0-test" not in versions and time.monotonic() < deadline:
                assert httpx.get(server.url + "/readyz").status_code == 200
                time.sleep(0.1)
            time.sleep(0.5)
            stop.set()
        log = server.log()
    assert versions == {"1.0.0-test", "2.0.0-test"}, log[-2000:]
    assert statuses and set(statuses) == {200}
    assert "model update: now serving btd-test 2.0.0-test" in log
