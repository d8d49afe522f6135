"""Helpers for service API tests (and anyone who needs the app running on a test model)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from fastapi.testclient import TestClient

from app.settings import Settings
from app.transports.http.main import create_app

TEST_HOST = "testserver"  # starlette's TestClient's Host


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    """Poll /readyz until the background model load is done (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout_s} s: {client.get('/readyz').json()}")


@contextmanager
def running_app(model_path: Path, *, ready: bool = True, **settings) -> Iterator[TestClient]:
    """A TestClient with the lifespan running; ``settings`` are Settings fields. The TestClient's
    requests name the host "testserver", which is therefore allowed unless a test says otherwise."""
    settings.setdefault("allowed_hosts", TEST_HOST)
    app = create_app(Settings(model_path=model_path, **settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        if ready:
            wait_ready(client)
        yield client


def png_bytes(shape=(96, 128), seed: int = 0, dtype=np.uint8) -> bytes:
    high = 256 if dtype == np.uint8 else 65536
    img = np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)
    return cv2.imencode(".png", img)[1].tobytes()


def jpeg_bytes(shape=(96, 128), seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def dicom_testfile(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name)).read_bytes()


def _spec() -> dict:
    import json

    from app.transports.http.spec import SPEC_PATH

    return json.loads(SPEC_PATH.read_text())


def spec_path(path: str, spec: dict | None = None) -> str | None:
    """The spec's path template that ``path`` matches (``/v2/models/{model_name}`` for ``/v2/models/m``)."""
    import re

    paths = (spec or _spec())["paths"]
    if path in paths:
        return path
    for template in paths:
        if re.fullmatch(re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template)), path):
            return template
    return None


def assert_matches_spec(response) -> None:
    """The response's status and media type are documented for its operation in openapi/openapi.json,
    and a JSON body validates against the documented schema."""
    import jsonschema

    spec = _spec()
    request = response.request
    operation = spec["paths"][spec_path(request.url.path, spec)][request.method.lower()]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"status {response.status_code} is not documented for {request.url.path}"
    media_type = response.headers["content-type"].split(";")[0]
    content = documented.get("content") or {"application/json": {"schema": {}}}
    assert media_type in content, f"{media_type} is not documented for {response.status_code}"
    if media_type.endswith("json"):  # DICOM bodies (application/dicom, multipart/related) are binary
        schema = {**content[media_type]["schema"], "components": spec["components"]}
        jsonschema.Draft202012Validator(schema).validate(response.json())


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    template = spec_path(response.request.url.path)
    if template and response.request.method.lower() in _spec()["paths"][template]:
        assert_matches_spec(response)  # a documented operation (not 404 / 405)
    body = response.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status
    assert body["title"] and body["detail"] and body["instance"].startswith("/")
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m app`` as a subprocess on a free 127.0.0.1 port; stopped (SIGTERM, then kill) on exit.

    with ServerProcess(model_path, BTD_MAX_WAIT_MS="50") as server:
        httpx.get(server.url + "/readyz")
    """

    def __init__(self, model_path: Path, ready_timeout_s: float = 60.0, *, scheme: str = "http",
                 verify: object = True, **env: str) -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify  # for HTTPS: an ssl.SSLContext that trusts the server's certificate
        self.model_path = model_path
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.proc = None
        self.log_path: Path | None = None

    def __enter__(self) -> ServerProcess:
        import os
        import subprocess
        import sys
        import tempfile

        import httpx

        repo = Path(__file__).resolve().parents[2]
        env = {**os.environ, "BTD_HOST": "127.0.0.1", "BTD_PORT": str(self.port),
               "BTD_MODEL_PATH": str(self.model_path), **self.env}
        self.log_path = Path(tempfile.mkstemp(prefix="btd-server-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=repo, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise AssertionError(f"server not ready after {self.ready_timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status (kills after ``timeout_s``)."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.terminate()
        self._log.close()
