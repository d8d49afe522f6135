"""What the inference core adds to the API: out-of-distribution fields, their warning and counter,
where the CAM lies in the image, admission by queue age, and the metrics of it all."""

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.core.result import Prediction
from tests.api.helpers import assert_matches_spec, assert_problem, running_app
from tests.api.test_api_predict import Gate, assert_prediction
from tests.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("BTD_DATA_DIR", REPO.parent / "shared" / "data"))


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
        finding = Prediction.from_dict(body)  # what the DICOM results report
        assert (finding.assessed, finding.ood_score, finding.ood_threshold) == (False, body["ood_score"], -1.0)
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
    with running_app(model_path, max_batch_size=1, max_wait_ms=0, model_runs=1, queue_size=64, max_queue_wait_ms=100) as client:
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


def metric_value(text: str, sample: str) -> float:
    """The value of one sample line (``name{labels}``) in a /metrics text, 0 when absent."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " "))


def test_not_assessed_answers_are_counted_under_their_own_label_not_a_class(tmp_path):
    with running_app(build_model(tmp_path / "ood.onnx", ood_threshold=-1.0)) as client:
        before = client.get("/metrics").text
        body = assert_prediction(post(client, head_png()))
        after = client.get("/metrics").text
    assert body["in_distribution"] is False
    for name in ('btd_predictions_total{label="not_assessed"}', 'btd_prediction_confidence_count{label="not_assessed"}'):
        assert metric_value(after, name) == metric_value(before, name) + 1, name
    for label in body["probabilities"]:  # the class it would have been is not counted
        for name in (f'btd_predictions_total{{label="{label}"}}', f'btd_prediction_confidence_count{{label="{label}"}}'):
            assert metric_value(after, name) == metric_value(before, name), name


def test_a_dicom_of_another_modality_is_not_assessed(tmp_path):
    from tests.hostile_inputs import dicom_with

    with running_app(build_model(tmp_path / "m.onnx", ood_threshold=1e9)) as client:
        def answer(modality: str) -> dict:
            response = client.post("/v1/predict", content=dicom_with("MR_small.dcm", Modality=modality),
                                   headers={"Content-Type": "application/dicom"})
            return assert_prediction(response)

        ct = answer("CT")
        assert ct["in_distribution"] is False and ct["ood_reasons"][0] == "modality"
        assert ct["tumour_detected"] is None
        assert any("the DICOM says it is not an MR image" in w for w in ct["warnings"])
        assert 'btd_out_of_distribution_total{reason="modality"}' in client.get("/metrics").text
        assert "modality" not in answer("MR")["ood_reasons"]


CT_SLICE = DATA_DIR / "brain-mri-4class" / "test" / "notumor" / "Te-no_0036.jpg"  # a CT head slice


@pytest.mark.skipif(not CT_SLICE.is_file(), reason="the shared data set is not here")
def test_a_ct_slice_as_jpeg_is_not_assessed(tmp_path):
    with running_app(build_model(tmp_path / "m.onnx", ood_threshold=1e9)) as client:
        body = assert_prediction(client.post("/v1/predict", content=CT_SLICE.read_bytes(),
                                             headers={"Content-Type": "image/jpeg"}))
    assert body["in_distribution"] is False and body["ood_reasons"] == ["modality"]
    assert body["tumour_detected"] is None
    assert any("looks like a CT slice" in w for w in body["warnings"])


def test_start_log_names_the_model_file_its_variant_and_the_threads(tmp_path, caplog):
    # What the README shows of the start: the model path asked for, the variant file served beside
    # it (the same model, int8), and the ready line with that variant and the thread count.
    import logging
    import shutil

    path = build_model(tmp_path / "m.onnx")
    shutil.copy(path, tmp_path / "m-int8.onnx")  # stands in for the quantised file beside it
    with caplog.at_level(logging.INFO), running_app(path, model_variant="auto", intra_op_threads=1):
        pass
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"loading model {path}, BTD_MODEL_VARIANT=auto") for line in lines), lines
    assert any(line.startswith("model m.onnx: serving its int8 variant, the file ") and "m-int8.onnx" in line
               for line in lines), lines
    ready = [line for line in lines if line.startswith("ready: ")]
    assert len(ready) == 1 and "(int8) on CPUExecutionProvider, 1 intra-op threads, " in ready[0], ready
