"""Fixtures for API tests: the app with its lifespan running on a test model (tests/model_factory.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.helpers import running_app
from tests.model_factory import build_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "btd-test.onnx")


@pytest.fixture(scope="module")
def client(model_path) -> Iterator[TestClient]:
    with running_app(model_path) as c:
        yield c
