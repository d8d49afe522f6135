"""Postprocessing and CAM: calibrated probabilities, tumour decision, CAM maths and encodings,
and the preprocess path the service uses (app.contract.preprocess through pipeline.prepare)."""

import base64

import cv2
import numpy as np
import pytest

from app.contract import ModelMetadata, PreprocessSpec, preprocess
from app.inference.decode import decode
from app.inference.pipeline import ResultBuilder, prepare
from app.inference.postprocess import (
    cam_grid,
    cam_images,
    class_activation_map,
    gray_view,
    softmax,
    tumour_probability,
    view_size,
)


def png_image(b64: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)


def test_softmax_sums_to_one_and_temperature_flattens():
    logits = np.array([2.0, 0.5, -1.0, 0.0])
    sharp, flat = softmax(logits, 1.0), softmax(logits, 3.0)
    assert sharp.sum() == pytest.approx(1.0) and flat.sum() == pytest.approx(1.0)
    assert np.argmax(sharp) == np.argmax(flat) == 0
    assert flat.max() < sharp.max()
    assert np.allclose(softmax(logits + 1000.0), sharp)  # no overflow


def test_tumour_probability_is_one_minus_notumor():
    assert tumour_probability([0.1, 0.2, 0.6, 0.1], ["a", "b", "notumor", "c"]) == pytest.approx(0.4)
    assert tumour_probability([0.3, 0.7], ["glioma", "meningioma"]) is None


def test_cam_is_relu_of_weighted_sum_normalised():
    rng = np.random.default_rng(0)
    features = rng.random((5, 3, 4)).astype(np.float32)
    weights = rng.normal(size=(2, 5)).astype(np.float32)
    cam = class_activation_map(features, weights, 1)
    expected = np.maximum(np.einsum("k,khw->hw", weights[1], features), 0)
    expected = expected / expected.max()
    assert cam.shape == (3, 4) and np.allclose(cam, expected, atol=1e-6)
    assert cam.max() == pytest.approx(1.0) and cam.min() >= 0


def test_cam_all_negative_is_zero():
    cam = class_activation_map(np.ones((3, 2, 2), np.float32), -np.ones((1, 3), np.float32), 0)
    assert not cam.any()


def test_cam_grid_reports_shape_and_values():
    cam = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert cam_grid(cam) == {"format": "grid", "shape": [1, 3], "grid": [[0.0, 0.5, 1.0]]}


def test_cam_images_have_input_size_and_heat_where_the_cam_is():
    view = np.full((60, 90), 100, np.uint8)
    cam = np.zeros((4, 6), np.float32)
    cam[0, 0] = 1.0  # hot top-left corner
    out = cam_images(view, cam)
    assert (out["width"], out["height"]) == (90, 60)
    image, heat, overlay = png_image(out["image_png"]), png_image(out["heatmap_png"]), png_image(out["overlay_png"])
    assert image.shape == (60, 90) and np.array_equal(image, view)
    assert heat.shape == (60, 90, 4) and overlay.shape == (60, 90, 3)
    assert heat[0, 0, 3] > heat[-1, -1, 3] == 0  # alpha follows the CAM
    assert np.array_equal(overlay[-1, -1], [100, 100, 100])  # no heat, untouched image
    assert not np.array_equal(overlay[0, 0], [100, 100, 100])


def test_gray_view_caps_long_side():
    big = np.random.default_rng(1).random((1500, 3000)).astype(np.float32)
    view = gray_view(big)
    assert view.shape == (512, 1024) and view.dtype == np.uint8
    assert view_size(100, 50) == (50, 100)


def test_prepare_uses_the_contract_preprocessing():
    spec = PreprocessSpec(size=48)
    img = np.random.default_rng(2).integers(0, 65535, (70, 90), dtype=np.uint16)
    data = cv2.imencode(".png", img)[1].tobytes()
    prepared = prepare(data, "image/png", spec)
    assert np.array_equal(prepared.tensor, preprocess(decode(data).pixels, spec))
    assert set(prepared.timings_ms) == {"decode", "preprocess"}


def test_prepare_warns_about_small_images():
    data = cv2.imencode(".png", np.zeros((20, 30), np.uint8))[1].tobytes()
    assert any("small" in w for w in prepare(data, None, PreprocessSpec(size=32)).warnings)


def test_result_builder_threshold_decides_and_cam_label_is_predicted_class():
    meta = ModelMetadata(labels=("glioma", "notumor"), preprocess=PreprocessSpec(size=32), cam_weight="w",
                         cam_bias="b", temperature=2.0)
    builder = ResultBuilder(meta, np.eye(2, dtype=np.float32), "0" * 64, threshold=0.7)
    data = cv2.imencode(".png", np.random.default_rng(3).integers(0, 255, (80, 80), dtype=np.uint8))[1].tobytes()
    prepared = prepare(data, None, meta.preprocess)
    features = np.random.default_rng(4).random((2, 4, 4)).astype(np.float32)
    result = builder.build(prepared, np.array([1.0, 0.0]), features, "grid", started=0.0, queue_ms=1.0,
                           inference_ms=2.0)
    p_glioma = 1 / (1 + np.exp(-0.5))  # softmax of [1, 0] / T=2
    assert result["probabilities"]["glioma"] == pytest.approx(p_glioma)
    assert result["tumour_probability"] == pytest.approx(p_glioma)
    assert result["tumour_detected"] is False  # 0.62 < 0.7
    assert result["cam"]["label"] == "glioma" and result["cam"]["shape"] == [4, 4]
    assert result["timings_ms"]["queue"] == 1.0 and result["timings_ms"]["inference"] == 2.0
