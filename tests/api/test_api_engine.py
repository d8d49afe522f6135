"""What the inference core adds to the API: out-of-distribution fields, their warning and counter,
where the CAM lies in the image, admission by queue age, and the metrics of it all."""

import threading
import time

import cv2
import numpy as np

from app.transports.pacs.finding import finding_from_result
from tests.api.helpers import assert_matches_spec, assert_problem, running_app
from tests.api.test_api_predict import Gate, assert_prediction
from tests.model_factory import build_model


def head_png(shape=(150, 200)) -> bytes:
    img = np.zeros(shape, np.uint8)
    cv2.ellipse(img, (70, 75), (45, 55), 0, 0, 360, 190, -1)  # a head left of centre on a wider canvas
    return cv2.imencode(".png", img)[1].tobytes()


def post(client, data: bytes, cam: str = "none"):
    return client.post(f"/v1/predict?cam={cam}", content=data, headers={"Content-Type": "image/png"})


def test_model_ood_score_over_threshold_gives_a_warning_no_decision_and_a_count(tmp_path):
    path = build_model(tmp_path / "ood.onnx", ood_threshold=-1.0)  # every score is over it
    with running_app(path) as client:
        body = assert_prediction(post(client, head_png()))
        assert body["in_distribution"] is False and isinstance(body["ood_score"], float)
        assert body["ood_threshold"] == -1.0  # the model's, so a reader sees how far over it the score is
        finding = finding_from_result(body)  # what the DICOM results report
        assert (finding.reportable, finding.ood_score, finding.ood_threshold) == (False, body["ood_score"], -1.0)
        assert body["tumour_detected"] is None and body["ood_reasons"] == ["model"]
        assert any("does not look like a brain MR slice" in w and "not a finding" in w for w in body["warnings"])
        assert client.get("/v1/model").json()["ood"]["threshold"] == -1.0
        assert 'btd_out_of_distribution_total{reason="model"}' in client.get("/metrics").text


def test_in_distribution_is_true_when_the_model_says_so(tmp_path):
    with running_app(build_model(tmp_path / "ood.onnx", ood_threshold=1e9)) as client:
        body = assert_prediction(post(client, head_png()))
        assert body["in_distribution"] is True and body["tumour_detected"] is not None and body["warnings"] == []


def test_cam_grid_and_png_say_where_they_lie_in_the_image(model_path):
    with running_app(model_path) as client:
        grid = assert_prediction(post(client, head_png(), "grid"))["cam"]
        png = assert_prediction(post(client, head_png(), "png"))["cam"]
    box = grid["box"]
    assert box == png["box"]
    # the model (spec version 2) saw a square around the head, not the whole 200x150 canvas
    assert box["width"] == box["height"] < 200 and box["x"] + box["width"] < 200
    heat = cv2.imdecode(np.frombuffer(__import__("base64").b64decode(png["heatmap_png"]), np.uint8),
                        cv2.IMREAD_UNCHANGED)
    right = int(np.ceil(box["x"] + box["width"])) + 1
    assert heat[:, right:, 3].max() == 0  # no heat right of the box


def test_requests_are_refused_while_the_oldest_has_waited_too_long(model_path):
    with running_app(model_path, max_batch_size=1, max_wait_ms=0, queue_size=64, max_queue_wait_ms=100) as client:
        batcher = client.app.state.runtime.service.batcher
        gate = Gate(batcher._run_batch)
        batcher._run_batch = gate
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(client, head_png()))) for _ in range(2)]
        threads[0].start()
        assert gate.entered.wait(10)
        threads[1].start()
        deadline = time.monotonic() + 10
        while batcher.depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the second request has now waited twice the limit
        try:
            response = post(client, head_png())
        finally:
            gate.release.set()
            for t in threads:
                t.join(10)
        body = assert_problem(response, 503, "overloaded")
        assert "not draining" in body["detail"] and int(response.headers["retry-after"]) >= 1
        assert [r.status_code for r in results] == [200, 200]
        assert_matches_spec(client.get("/v1/model"))
        assert post(client, head_png()).status_code == 200  # drained: admitted again


def test_host_worker_processes_serve_every_cam_mode_like_threads(model_path):
    with running_app(model_path, host_workers=1) as client:
        assert client.get("/v1/model").json()["host_work"] == "processes"
        answers = {cam: assert_prediction(post(client, head_png(), cam)) for cam in ("none", "grid", "png")}
        bad = client.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 40, headers={"Content-Type": "image/png"})
    with running_app(model_path, host_workers=0) as client:
        threads = {cam: assert_prediction(post(client, head_png(), cam)) for cam in ("none", "grid", "png")}
    assert_problem(bad, 400, "invalid-image")  # a typed error raised in a worker keeps its status
    for cam in answers:
        assert answers[cam]["probabilities"] == threads[cam]["probabilities"]
        assert answers[cam]["cam"] == threads[cam]["cam"]
