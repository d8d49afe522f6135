"""Helpers for service API tests (and anyone who needs the app running on a test model)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


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
    """A TestClient with the lifespan running; ``settings`` are Settings fields."""
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


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == f"/problems/{slug}" and body["status"] == status
    assert body["title"] and body["detail"] and body["instance"].startswith("/")
    assert body["request_id"] == response.headers["x-request-id"]
    return body
