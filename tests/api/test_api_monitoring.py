"""GET /v1/monitoring: drift of the recorded answers against the model's baseline, the drift gauges on
/metrics, and the performance section's place (null until live performance is measured)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.exc import SQLAlchemyError

from app.core.baseline import build_baseline, signal_values
from app.engine.records.store import RecordStore
from app.transports.http.api_keys import key_line, new_key
from model_export.baseline import stamp
from tests.api.helpers import assert_matches_spec, png_bytes, running_app
from tests.model_factory import LABELS, build_model


@pytest.fixture(scope="module")
def baselined_model(tmp_path_factory) -> Path:
    """The test model with a baseline its answers to noise PNGs cannot match: every validation answer
    was 'glioma' with a tumour probability near 1."""
    rng = np.random.default_rng(0)
    answers = [signal_values(label=LABELS[0], assessed=True, tumour_probability=float(rng.uniform(0.98, 1.0)),
                             ood_score=None, percentiles=(0.0, 0.0, 50.0, 120.0, 200.0)) for _ in range(500)]
    path = build_model(tmp_path_factory.mktemp("baselined") / "m.onnx")
    return stamp(path, build_baseline(answers, LABELS, source={"split": "val"}))


def wait_for_records(url: str, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with RecordStore(url) as store:
        while time.monotonic() < deadline:
            with contextlib.suppress(SQLAlchemyError):  # until the writer has migrated the database
                if store.count() >= count:
                    return
            time.sleep(0.05)
    raise AssertionError(f"fewer than {count} records after {timeout_s} s")


def test_monitoring_without_a_baseline_says_so(model_path, tmp_path):
    with running_app(model_path, records_dir=tmp_path) as client:
        response = client.get("/v1/monitoring")
    assert response.status_code == 200
    assert_matches_spec(response)
    body = response.json()
    assert body["model_version"] == "0.0.1-test"
    assert body["drift"]["status"] == "no-baseline" and body["drift"]["alert"] is False
    assert body["performance"] is None


def test_monitoring_reports_drift_of_the_recorded_answers(baselined_model, tmp_path):
    images = 12
    with running_app(baselined_model, records_dir=tmp_path, drift_window=10, drift_min_records=5,
                     drift_interval_s=3600) as client:
        for i in range(images):
            assert client.post("/v1/predict", content=png_bytes((120, 120), seed=i),
                               headers={"Content-Type": "image/png"}).status_code == 200
        wait_for_records(f"sqlite:///{tmp_path / 'btd.db'}", images)
        client.app.state.monitor.refresh()  # the thread refreshes hourly here: now, for the test
        response = client.get("/v1/monitoring")
        metrics = client.get("/metrics").text
    assert response.status_code == 200
    assert_matches_spec(response)
    drift = response.json()["drift"]
    assert drift["window_records"] == 10 and drift["rule"] == {"psi_threshold": 0.25, "min_records": 5, "window": 10}
    assert drift["baseline"]["images"] == 500
    mix = drift["signals"]["class_mix"]
    assert mix["records"] == 10 and mix["threshold"] == 0.25
    assert [p["records"] for p in mix["history"]] == [10]  # the 2 oldest make no full window
    tumour = drift["signals"]["tumour_probability"]
    assert tumour["psi"] > 0.25 and tumour["over_threshold"]  # noise is never 'glioma at 0.99'
    assert drift["alert"] and drift["status"] == "alert"
    assert "ood_score" not in drift["signals"]  # the baseline has none: the test model has no OOD output
    assert 'btd_drift_over_threshold{model_version="0.0.1-test",signal="tumour_probability"} 1.0' in metrics
    assert 'btd_drift_window_records{model_version="0.0.1-test"} 10.0' in metrics


def test_monitoring_needs_a_key_like_the_model_description(model_path, tmp_path):
    key = new_key()
    with running_app(model_path, records_dir=tmp_path, api_keys=key_line("ops", key)) as client:
        assert client.get("/v1/monitoring").status_code == 401
        assert client.get("/v1/monitoring", headers={"X-API-Key": key}).status_code == 200
