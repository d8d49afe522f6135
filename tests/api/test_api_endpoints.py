"""/v1/predict/batch, /v1/model, /livez, /readyz, /metrics and the generic 404/405 problems."""

import logging
import threading

import pytest
from prometheus_client import REGISTRY

from app.engine.service import InferenceService
from app.settings import Settings
from app.transports.http.routes import get_settings
from tests.api.helpers import (
    assert_matches_spec,
    assert_problem,
    dicom_testfile,
    png_bytes,
    running_app,
    wait_ready,
)
from tests.model_factory import LABELS

# --- batch ------------------------------------------------------------------------------------------


def test_batch_returns_results_in_order_and_isolates_bad_files(client):
    files = [("files", ("a.png", png_bytes(seed=1), "image/png")),
             ("files", ("b.txt", b"not an image", "text/plain")),
             ("files", ("c.dcm", dicom_testfile("MR_small.dcm"), "application/dicom")),
             ("files", ("d.dcm", dicom_testfile("rtplan.dcm"), "application/dicom"))]
    response = client.post("/v1/predict/batch?cam=grid", files=files)
    assert response.status_code == 200
    assert_matches_spec(response)
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "b.txt", "c.dcm", "d.dcm"]
    assert [r["ok"] for r in results] == [True, False, True, False]
    assert results[0]["result"]["cam"]["format"] == "grid"
    assert results[0]["result"]["request_id"] == response.headers["x-request-id"]
    assert results[1]["problem"]["status"] == 415 and results[3]["problem"]["type"] == "/problems/no-pixel-data"


def test_batch_results_match_single_predictions(client):
    data = png_bytes(seed=7)
    single = client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"}).json()
    batch = client.post("/v1/predict/batch", files=[("files", ("x.png", data)), ("files", ("y.png", data))]).json()
    for item in batch["results"]:
        for label in LABELS:
            assert item["result"]["probabilities"][label] == pytest.approx(single["probabilities"][label], abs=1e-5)


def test_batch_over_file_limit_is_413(model_path):
    with running_app(model_path, max_batch_files=2) as client:
        files = [("files", (f"{i}.png", png_bytes(seed=i))) for i in range(3)]
        body = assert_problem(client.post("/v1/predict/batch", files=files), 413, "payload-too-large")
        assert "2" in body["detail"]


def test_batch_without_files_field_is_422(client):
    assert_problem(client.post("/v1/predict/batch", files={"file": ("a.png", png_bytes())}), 422,
                   "validation-error")


def test_batch_raw_body_is_415(client):
    assert_problem(client.post("/v1/predict/batch", content=png_bytes(), headers={"Content-Type": "image/png"}),
                   415, "unsupported-media-type")


def test_batch_malformed_multipart_is_400(client):
    assert_problem(client.post("/v1/predict/batch", content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}),
                   400, "bad-request")


# --- model, health, metrics -------------------------------------------------------------------------


def test_model_describes_labels_input_and_provider(client):
    response = client.get("/v1/model")
    assert_matches_spec(response)
    body = response.json()
    assert body["labels"] == list(LABELS) and body["input"]["size"] == 32
    assert body["provider"] == "CPUExecutionProvider" and body["providers"][0] == body["provider"]
    assert body["metrics"] == {"accuracy": 0.25} and body["training_data"] == {"source": "synthetic"}
    assert body["threshold"] == 0.5 and body["name"] == "btd-test" and len(body["sha256"]) == 64
    assert body["variant"] == "fp32" and body["batch_buckets"] == [1, 2, 4, 8] and body["ood"] is None
    assert body["host_work"] in ("threads", "processes") and body["host_workers"] >= 1


def test_health_endpoints_are_green_when_loaded(client):
    for path in ("/livez", "/readyz"):
        assert_matches_spec(client.get(path))
    assert client.get("/livez").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}


def test_readyz_is_503_while_draining(client):
    state = client.app.state.runtime
    state.draining = True  # what SIGTERM sets (python -m app); the e2e test signals a real server
    try:
        body = assert_problem(client.get("/readyz"), 503, "model-not-ready")
        assert "shutting down" in body["detail"]
        assert client.get("/livez").status_code == 200
    finally:
        state.draining = False


def test_not_ready_until_model_loaded_checked_and_warmed_up(model_path, monkeypatch):
    release = threading.Event()
    original = InferenceService.load

    def slow_load(*args):
        release.wait(10)
        return original(*args)

    monkeypatch.setattr(InferenceService, "load", staticmethod(slow_load))
    with running_app(model_path, ready=False) as client:
        assert client.get("/livez").status_code == 200
        assert "loading" in assert_problem(client.get("/readyz"), 503, "model-not-ready")["detail"]
        assert_problem(client.get("/v1/model"), 503, "model-not-ready")
        assert_problem(client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"}),
                       503, "model-not-ready")
        assert_problem(client.post("/v1/predict/batch", files=[("files", ("a.png", png_bytes()))]),
                       503, "model-not-ready")
        release.set()
        wait_ready(client)
        assert client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"}).status_code == 200


def _not_ready_errors() -> float:
    return REGISTRY.get_sample_value("btd_errors_total", {"type": "model-not-ready"}) or 0.0


def test_probes_while_loading_are_a_state_not_errors(model_path, monkeypatch, caplog):
    release = threading.Event()
    original = InferenceService.load

    def slow_load(*args):
        release.wait(10)
        return original(*args)

    monkeypatch.setattr(InferenceService, "load", staticmethod(slow_load))
    with running_app(model_path, ready=False) as client:
        errors_before = _not_ready_errors()
        with caplog.at_level(logging.INFO):
            for _ in range(5):  # what Kubernetes' startup and readiness probes do while the model loads
                assert_problem(client.get("/readyz"), 503, "model-not-ready")
        assert _not_ready_errors() == errors_before
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert REGISTRY.get_sample_value("btd_ready") == 0.0  # the state, as a gauge
        # A client's request refused while loading is still an error response, and counted.
        client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
        assert _not_ready_errors() == errors_before + 1
        release.set()
        wait_ready(client)
        assert REGISTRY.get_sample_value("btd_ready") == 1.0


def test_broken_model_makes_livez_and_readyz_fail(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00" * 100)
    with running_app(path, ready=False) as client:
        for _ in range(200):
            if client.app.state.runtime.load_error:
                break
            threading.Event().wait(0.02)
        assert "failed to load" in assert_problem(client.get("/livez"), 503, "model-not-ready")["detail"]
        assert_problem(client.get("/readyz"), 503, "model-not-ready")


def test_settings_dependency_can_be_overridden(client):
    client.app.dependency_overrides[get_settings] = lambda: Settings(max_batch_files=1)
    try:
        files = [("files", (f"{i}.png", png_bytes(seed=i))) for i in range(2)]
        assert_problem(client.post("/v1/predict/batch", files=files), 413, "payload-too-large")
    finally:
        client.app.dependency_overrides.clear()


def test_metrics_expose_every_service_metric(client):
    client.post("/v1/predict?cam=grid", content=png_bytes(), headers={"Content-Type": "image/png"})
    client.post("/v1/predict", content=b"nope", headers={"Content-Type": "text/plain"})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("btd_http_request_duration_seconds_bucket", "btd_stage_duration_seconds_bucket",
                 "btd_batch_size_bucket", "btd_queue_depth", "btd_in_flight_requests", "btd_predictions_total",
                 "btd_prediction_confidence_bucket", "btd_errors_total", "btd_model_info", "btd_ready",
                 "btd_records_written_total", 'btd_records_lost_total{reason="database"}', "btd_records_waiting"):
        assert name in text, name
    assert 'route="/v1/predict",status="200"' in text
    assert 'btd_errors_total{type="unsupported-media-type"}' in text
    assert 'provider="CPUExecutionProvider"' in text
    for stage in ("decode", "preprocess", "queue", "infer", "cam", "region"):
        assert f'btd_stage_duration_seconds_count{{stage="{stage}"}}' in text


# --- generic errors ---------------------------------------------------------------------------------


def test_unknown_path_is_404_problem(client):
    assert_problem(client.get("/v2/nothing"), 404, "not-found")


def test_wrong_method_is_405_problem(client):
    response = client.get("/v1/predict")
    assert_problem(response, 405, "method-not-allowed")
    assert "POST" in response.headers["allow"]


def test_unexpected_error_is_500_problem_with_request_id_and_no_internals(client, monkeypatch):
    def broken():
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(client.app.state.runtime.service, "describe", broken)
    response = client.get("/v1/model", headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "/problems/internal-error" and body["instance"] == "/v1/model"
    assert response.headers["x-request-id"] == "trace-500" and body["request_id"] == "trace-500"
    assert "secret" not in response.text


def test_the_api_document_and_v1_model_list_the_registered_formats(client):
    from app.core import formats
    from app.transports.http.openapi_docs import PREDICT_BODY

    content = PREDICT_BODY["requestBody"]["content"]
    assert {f.media_type for f in formats.FORMATS} <= set(content)
    listed = client.get("/v1/model").json()["formats"]
    assert [f["media_type"] for f in listed] == [f.media_type for f in formats.FORMATS]
