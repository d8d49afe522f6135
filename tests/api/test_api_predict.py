"""POST /v1/predict with the lifespan running: every documented status, body and header."""

import base64
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np
import pytest

from app.core.contract import LocalisationSpec
from tests.api.helpers import (
    assert_matches_spec,
    assert_problem,
    dicom_testfile,
    jpeg_bytes,
    png_bytes,
    running_app,
)
from tests.model_factory import build_model, tumour_slice_png

SERVER_TIMING_NAMES = ["decode", "preprocess", "queue", "infer", "cam", "region", "total"]


def assert_prediction(response) -> dict:
    assert response.status_code == 200, response.text
    assert_matches_spec(response)
    body = response.json()
    assert math.isclose(sum(body["probabilities"].values()), 1.0, abs_tol=1e-9)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["request_id"] == response.headers["x-request-id"]
    assert [part.split(";")[0] for part in response.headers["server-timing"].split(", ")] == SERVER_TIMING_NAMES
    assert set(body["timings_ms"]) == {"decode", "preprocess", "queue", "inference", "cam", "region", "total"}
    assert len(body["model"]["sha256"]) == 64
    return body


def test_predict_multipart_png_returns_prediction(client):
    assert_prediction(client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")}))


@pytest.mark.parametrize("content_type,data", [
    ("image/png", png_bytes(dtype=np.uint16)),
    ("image/jpeg", jpeg_bytes()),
    ("application/dicom", dicom_testfile("MR_small.dcm")),
    ("application/octet-stream", jpeg_bytes()),
])
def test_predict_raw_body_returns_prediction(client, content_type, data):
    assert_prediction(client.post("/v1/predict", content=data, headers={"Content-Type": content_type}))


def test_predict_multipart_with_generic_part_type_sniffs_bytes(client):
    data = dicom_testfile("MR_small.dcm")
    body = assert_prediction(client.post("/v1/predict", files={"file": ("x.dcm", data, "application/octet-stream")}))
    # an axial T2 MR slice (spin echo, TR 4000 ms, TE 240 ms: outside the validated use) and 64x64, too
    # small to be a whole slice: no finding is made, and each kind of reason has its warning
    assert body["ood_reasons"] == ["sequence", "small-image"] and body["in_distribution"] is False
    assert body["acquisition"] == {"plane": "axial", "sequence": "t2"}
    assert len(body["warnings"]) == 2 and "the sequence is T2" in body["warnings"][0]
    assert "64x64 pixels, too small" in body["warnings"][1]
    assert body["tumour_detected"] is None


def test_predict_echoes_client_request_id(client):
    response = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png",
                                                                       "X-Request-ID": "pacs-42.a"})
    assert response.headers["x-request-id"] == "pacs-42.a" and response.json()["request_id"] == "pacs-42.a"


def test_predict_replaces_unsafe_request_id(client):
    response = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png",
                                                                       "X-Request-ID": "a b<script>"})
    assert response.headers["x-request-id"] != "a b<script>" and len(response.headers["x-request-id"]) == 36


def test_predict_cam_png_returns_overlay_at_input_size(client):
    body = assert_prediction(client.post("/v1/predict?cam=png", files={"file": ("a.png", png_bytes((90, 150)))}))
    cam = body["cam"]
    assert cam["format"] == "png" and (cam["width"], cam["height"]) == (150, 90) and cam["label"] == body["label"]
    for key, channels in (("image_png", None), ("heatmap_png", 4), ("overlay_png", 3)):
        img = cv2.imdecode(np.frombuffer(base64.b64decode(cam[key]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape[:2] == (90, 150) and (img.ndim == 2 if channels is None else img.shape[2] == channels)
    assert body["timings_ms"]["cam"] > 0


def test_predict_cam_grid_returns_normalised_grid(client):
    body = assert_prediction(client.post("/v1/predict?cam=grid", files={"file": ("a.png", png_bytes())}))
    grid = np.array(body["cam"]["grid"])
    assert list(grid.shape) == body["cam"]["shape"] == [8, 8]
    assert grid.min() >= 0 and grid.max() <= 1


def test_predict_dicom_multiframe_warns_and_non_mr_is_not_assessed(client):
    body = assert_prediction(client.post("/v1/predict", content=dicom_testfile("emri_small.dcm"),
                                         headers={"Content-Type": "application/dicom"}))
    assert any("multi-frame" in w for w in body["warnings"])
    body = assert_prediction(client.post("/v1/predict", content=dicom_testfile("CT_small.dcm"),
                                         headers={"Content-Type": "application/dicom"}))
    assert body["in_distribution"] is False and "modality" in body["ood_reasons"]
    assert body["tumour_detected"] is None and any("not an MR image" in w for w in body["warnings"])


def test_predict_multiframe_policy_is_configurable(model_path):
    with running_app(model_path, multiframe="first") as client:
        body = assert_prediction(client.post("/v1/predict", content=dicom_testfile("emri_small.dcm"),
                                             headers={"Content-Type": "application/dicom"}))
    assert any("multi-frame" in w and "first frame (1)" in w for w in body["warnings"])


def test_predict_truncated_image_is_400(client):
    assert_problem(client.post("/v1/predict", content=png_bytes()[:50], headers={"Content-Type": "image/png"}),
                   400, "invalid-image")


def test_predict_malformed_multipart_is_400(client):
    response = client.post("/v1/predict", content=b"--xyz\r\nContent-Disposition: form-data\r\n\r\nab\r\n--xyz--",
                           headers={"Content-Type": "multipart/form-data"})  # no boundary
    assert_problem(response, 400, "bad-request")


@pytest.mark.parametrize("headers,data", [
    ({"Content-Type": "text/plain"}, b"hello"),
    ({"Content-Type": "image/jpeg"}, png_bytes()),
    ({}, png_bytes()),
    ({"Content-Type": "application/octet-stream"}, b"GIF89a" + bytes(64)),
])
def test_predict_unsupported_or_mismatched_media_type_is_415(client, headers, data):
    assert_problem(client.post("/v1/predict", content=data, headers=headers), 415, "unsupported-media-type")


def test_predict_compressed_dicom_without_decoder_is_415_naming_syntax(model_path, monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import RLELossless

    monkeypatch.setattr(get_decoder(RLELossless), "_available", {})
    with running_app(model_path, host_workers=0) as client:  # DICOM decoded in this process: the patch applies
        body = assert_problem(client.post("/v1/predict", content=dicom_testfile("MR_small_RLE.dcm"),
                                          headers={"Content-Type": "application/dicom"}), 415, "unsupported-media-type")
    assert "RLE Lossless" in body["detail"]


def test_predict_bad_cam_option_is_422(client):
    body = assert_problem(client.post("/v1/predict?cam=heat", content=png_bytes(),
                                      headers={"Content-Type": "image/png"}), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["query", "cam"]


def test_predict_multipart_without_file_field_is_422(client):
    assert_problem(client.post("/v1/predict", files={"image": ("a.png", png_bytes())}), 422, "validation-error")


def test_predict_dicom_without_pixel_data_is_422(client):
    assert_problem(client.post("/v1/predict", content=dicom_testfile("rtplan.dcm"),
                               headers={"Content-Type": "application/dicom"}), 422, "no-pixel-data")


def test_predict_body_over_limit_is_413_by_content_length(model_path):
    with running_app(model_path, max_body_bytes=4096) as client:
        response = client.post("/v1/predict", content=bytes(5000), headers={"Content-Type": "image/png"})
        body = assert_problem(response, 413, "payload-too-large")
        assert "4096" in body["detail"]


def test_predict_413_by_content_length_is_counted_under_its_route(model_path):
    from prometheus_client import REGISTRY

    labels = {"route": "/v1/predict", "method": "POST", "status": "413"}
    count = lambda: REGISTRY.get_sample_value("btd_http_request_duration_seconds_count", labels) or 0.0
    with running_app(model_path, max_body_bytes=4096) as client:
        before = count()
        response = client.post("/v1/predict", content=bytes(5000), headers={"Content-Type": "image/png"})
        assert response.status_code == 413 and count() == before + 1  # not under route="unmatched"


def test_predict_streamed_body_over_limit_is_413(model_path):
    def chunks():  # no Content-Length: the server must count
        for _ in range(10):
            yield bytes(1024)

    with running_app(model_path, max_body_bytes=4096) as client:
        response = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "image/png"})
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert_problem(response, 413, "payload-too-large")


def test_predict_decompression_bomb_is_413(model_path):
    with running_app(model_path, max_pixels=100_000) as client:
        bomb = cv2.imencode(".png", np.zeros((1000, 1000), np.uint8))[1].tobytes()
        assert_problem(client.post("/v1/predict", content=bomb, headers={"Content-Type": "image/png"}),
                       413, "payload-too-large")


class Gate:
    """Holds the model call until released, so tests can fill the queue or outlast the timeout."""

    def __init__(self, run_batch) -> None:
        self.run_batch = run_batch
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, tensors, features):
        self.entered.set()
        self.release.wait(10)
        return self.run_batch(tensors, features)


def _gate_model(client) -> Gate:
    batcher = client.app.state.runtime.service.batcher
    gate = Gate(batcher._run_batch)
    batcher._run_batch = gate
    return gate


@contextmanager
def full_queue(client) -> Iterator[list]:
    """With queue_size=1, max_batch_size=1 and model_runs=1: one request held in the model, one waiting in the
    queue, until exit; yields the list their responses are appended to (after exit)."""
    gate = _gate_model(client)
    post = lambda: client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
    results = []
    threads = [threading.Thread(target=lambda: results.append(post())) for _ in range(2)]
    threads[0].start()
    assert gate.entered.wait(10)  # first request is in the model
    threads[1].start()
    batcher = client.app.state.runtime.service.batcher
    deadline = time.monotonic() + 10
    while batcher.depth < 1 and time.monotonic() < deadline:  # second one waits in the queue
        time.sleep(0.01)
    try:
        yield results
    finally:
        gate.release.set()
        for t in threads:
            t.join(10)


def test_predict_full_queue_is_503_with_retry_after(model_path):
    with running_app(model_path, max_batch_size=1, max_wait_ms=0, model_runs=1, queue_size=1) as client:
        with full_queue(client) as results:
            response = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
        body = assert_problem(response, 503, "overloaded")
        assert int(response.headers["retry-after"]) >= 1 and "queue" in body["detail"]
        assert [r.status_code for r in results] == [200, 200]


def test_batch_on_full_queue_is_503_with_retry_after(model_path):
    # not a 200 whose every file failed "overloaded": clients and proxies retry on 503 + Retry-After
    with running_app(model_path, max_batch_size=1, max_wait_ms=0, model_runs=1, queue_size=1) as client:
        with full_queue(client) as results:
            response = client.post("/v1/predict/batch", files=[("files", ("a.png", png_bytes(), "image/png"))])
        body = assert_problem(response, 503, "overloaded")
        assert int(response.headers["retry-after"]) >= 1 and "queue" in body["detail"]
        assert [r.status_code for r in results] == [200, 200]


def test_predict_slower_than_timeout_is_504(model_path):
    with running_app(model_path, request_timeout_s=0.3) as client:
        gate = _gate_model(client)
        response = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
        gate.release.set()
        assert_problem(response, 504, "timeout")
        # the server is still healthy afterwards
        assert client.get("/readyz").status_code == 200


@pytest.fixture(scope="module")
def localising_client(tmp_path_factory) -> Iterator:
    """A model with a tumour map (tests/model_factory.py: high where the slice is bright); every assessed
    image is a called tumour (threshold 0)."""
    path = build_model(tmp_path_factory.mktemp("localising") / "m.onnx", size=64,
                       localisation=LocalisationSpec(threshold=0.5, min_area=0.002))
    with running_app(path, tumour_threshold=0.0) as client:
        yield client


@pytest.mark.parametrize("cam", ["none", "png"])
def test_predict_with_a_localising_model_answers_the_tumour_region(localising_client, cam):
    image = tumour_slice_png(blob=(120, 150))
    body = assert_prediction(localising_client.post(f"/v1/predict?cam={cam}", files={"file": ("a.png", image)}))
    region = body["region"]
    assert body["tumour_detected"] is True and region is not None
    box = region["box"]
    assert box["x"] <= 105 and 135 <= box["x"] + box["width"] and box["y"] <= 135 and 165 <= box["y"] + box["height"]
    assert box["width"] < 80 and box["height"] < 80
    assert all(0 <= x < 320 and 0 <= y < 256 for contour in region["contours"] for x, y in contour)
    assert region["threshold"] == 0.5 and region["min_area"] == 0.002
    assert (body["cam"] is None) is (cam == "none")  # the CAM is there as before, when asked for
    assert localising_client.get("/v1/model").json()["localisation"] == {"threshold": 0.5, "min_area": 0.002}


def test_predict_region_is_null_when_not_assessed_or_the_model_has_no_map(localising_client, client):
    small = tumour_slice_png(shape=(64, 80), blob=(40, 30), radius=6)  # under 100 pixels: not assessed
    body = assert_prediction(localising_client.post("/v1/predict", files={"file": ("a.png", small)}))
    assert body["in_distribution"] is False and body["region"] is None
    body = assert_prediction(client.post("/v1/predict", files={"file": ("a.png", tumour_slice_png())}))
    assert body["region"] is None and client.get("/v1/model").json()["localisation"] is None
