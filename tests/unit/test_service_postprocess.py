"""Postprocessing and CAM: calibrated probabilities, tumour decision, CAM maths and encodings,
and the preprocess path the service uses (app.core.contract.preprocess through pipeline.prepare)."""

import base64

import cv2
import numpy as np
import pytest

from app.core.contract import Framing, ModelMetadata, OodSpec, PreprocessSpec, preprocess
from app.core.decision import decide, softmax, tumour_probability
from app.core.decode import decode
from app.core.postprocess import (
    cam_grid,
    cam_images,
    class_activation_map,
    gray_view,
    place_cam,
    view_size,
)
from app.core.result import ModelOutput
from app.engine.pipeline import PrepareOptions, ResultBuilder, prepare


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


def head_png(shape=(120, 160), centre=(80, 60), axes=(40, 50)) -> bytes:
    img = np.zeros(shape, np.uint8)
    cv2.ellipse(img, centre, axes, 0, 0, 360, 180, -1)
    return cv2.imencode(".png", img)[1].tobytes()


def test_prepare_uses_the_contract_preprocessing():
    spec = PreprocessSpec(size=48)
    img = np.random.default_rng(2).integers(0, 65535, (70, 90), dtype=np.uint16)
    data = cv2.imencode(".png", img)[1].tobytes()
    prepared = prepare(data, "image/png", PrepareOptions(spec))
    assert np.array_equal(prepared.tensor, preprocess(decode(data).pixels, spec))
    assert set(prepared.timings_ms) == {"decode", "preprocess"}
    assert prepared.image_size == (90, 70) and prepared.view is None


def test_prepare_keeps_the_view_only_for_cam_images():
    prepared = prepare(head_png(), None, PrepareOptions(PreprocessSpec(size=32)), view=True)
    assert prepared.view.dtype == np.uint8 and prepared.view.shape == (120, 160)


def test_small_images_and_headless_images_are_out_of_distribution_by_the_image_alone():
    options = PrepareOptions(PreprocessSpec(size=32))
    small = prepare(cv2.imencode(".png", np.full((99, 300), 50, np.uint8))[1].tobytes(), None, options)
    assert "small-image" in small.image_reasons
    blank = prepare(cv2.imencode(".png", np.zeros((120, 120), np.uint8))[1].tobytes(), None, options)
    assert blank.framing.head_found is False and blank.image_reasons == ["no-head"]
    assert prepare(head_png(), None, options).image_reasons == []
    v1 = prepare(cv2.imencode(".png", np.zeros((120, 120), np.uint8))[1].tobytes(), None,
                 PrepareOptions(PreprocessSpec.legacy(32)))
    assert v1.framing.head_found is None and v1.image_reasons == []  # version 1 does not look for a head


def builder_for(meta: ModelMetadata, threshold: float = 0.5) -> ResultBuilder:
    return ResultBuilder(meta, np.eye(2, dtype=np.float32), "0" * 64, threshold=threshold)


META = ModelMetadata(labels=("glioma", "notumor"), preprocess=PreprocessSpec(size=32), cam_weight="w",
                     cam_bias="b", temperature=2.0)


def test_result_builder_threshold_decides_and_cam_label_is_predicted_class():
    builder = builder_for(META, threshold=0.7)
    prepared = prepare(head_png(), None, PrepareOptions(META.preprocess))
    features = np.random.default_rng(4).random((2, 4, 4)).astype(np.float32)
    result = builder.build(prepared, ModelOutput(np.array([1.0, 0.0]), features, None, 1.0, 2.0), "grid",
                           started=0.0)
    p_glioma = 1 / (1 + np.exp(-0.5))  # softmax of [1, 0] / T=2
    assert result.probabilities["glioma"] == pytest.approx(p_glioma)
    assert result.tumour_probability == pytest.approx(p_glioma)
    assert result.tumour_detected is False  # 0.62 < 0.7
    assert result.cam.label == "glioma" and result.cam.shape == [4, 4]
    framing = prepared.framing
    assert (result.cam.box.x, result.cam.box.y, result.cam.box.width) == pytest.approx(
        (framing.x, framing.y, framing.side), abs=0.01)
    assert result.timings_ms.queue == 1.0 and result.timings_ms.inference == 2.0
    assert result.in_distribution is None and result.ood_score is None and result.warnings == []


@pytest.mark.parametrize("score,threshold,expected", [(0.2, 0.5, True), (0.9, 0.5, False)])
def test_model_ood_score_over_its_threshold_makes_no_finding(score, threshold, expected):
    meta = ModelMetadata(labels=META.labels, preprocess=META.preprocess, cam_weight="w", cam_bias="b",
                         ood=OodSpec(threshold=threshold))
    prepared = prepare(head_png(), None, PrepareOptions(meta.preprocess))
    result = builder_for(meta).build(prepared, ModelOutput(np.array([3.0, 0.0]), None, score), "none", started=0.0)
    assert result.in_distribution is expected and result.ood_score == pytest.approx(score)
    if expected:
        assert result.tumour_detected is True and result.warnings == [] and result.ood_reasons == []
    else:
        assert result.tumour_detected is None and result.ood_reasons == ["model"]
        assert len(result.warnings) == 1 and "does not look like a brain MR slice" in result.warnings[0]
        assert "not a finding" in result.warnings[0] and "0.9" in result.warnings[0]
    assert result.probabilities["glioma"] > 0.5  # the probabilities are still given


def test_image_rules_make_no_finding_even_without_a_model_score():
    prepared = prepare(cv2.imencode(".png", np.full((60, 80), 7, np.uint8))[1].tobytes(), None,
                       PrepareOptions(META.preprocess))
    result = builder_for(META).build(prepared, ModelOutput(np.array([3.0, 0.0])), "none", started=0.0)
    assert result.in_distribution is False and result.tumour_detected is None
    assert result.ood_reasons == ["no-head", "small-image"]
    assert "no head" in result.warnings[-1] and "80x60" in result.warnings[-1]


def test_cam_png_is_placed_through_the_framing_and_grid_says_where():
    meta = ModelMetadata(labels=META.labels, preprocess=PreprocessSpec(size=32), cam_weight="w", cam_bias="b")
    # a small head in the top-left corner of a big canvas: the model's square covers that corner only
    prepared = prepare(head_png((200, 300), centre=(60, 50), axes=(30, 35)), None, PrepareOptions(meta.preprocess),
                       view=True)
    box = prepared.framing
    assert box.side < 120 and box.x < 60 and box.y < 60
    features = np.ones((2, 4, 4), np.float32)  # a flat CAM: 1 over the whole model input
    result = builder_for(meta).build(prepared, ModelOutput(np.array([1.0, 0.0]), features), "png", started=0.0)
    heat = png_image(result.cam.heatmap_png)
    assert heat.shape == (200, 300, 4)
    alpha = heat[:, :, 3]
    assert alpha[50, 60] > 0  # inside the box: heat
    assert alpha[150, 250] == 0 and alpha[:, int(box.x + box.side) + 2:].max() == 0  # outside the box: none
    assert alpha[int(box.y + box.side) + 2:, :].max() == 0
    assert (result.cam.box.x, result.cam.box.width) == pytest.approx((box.x, box.side), abs=0.01)


def test_place_cam_of_a_whole_image_framing_is_the_old_stretch():
    cam = np.random.default_rng(5).random((7, 7)).astype(np.float32)
    whole = Framing(0.0, 0.0, 90.0, height=60.0)
    placed = place_cam(cam, whole, (90, 60), (90, 60))
    assert np.array_equal(placed, cv2.resize(cam, (90, 60), interpolation=cv2.INTER_LINEAR))
    # a square framing reaching past the image: the part outside the image is dropped, shape stays the view's
    inside = place_cam(cam, Framing(-10.0, 5.0, 50.0), (90, 60), (45, 30))
    assert inside.shape == (30, 45) and inside[:, 21:].max() == 0 and inside[:2].max() == 0


@pytest.mark.parametrize("score,reasons,expected", [
    (None, (), (None, None)),  # no OOD output, no rule: the model cannot say; tumour called
    (1.0, (), (True, None)),  # under the threshold: in distribution
    (5.0, (), (False, ["model"])),  # over it: not assessed
    (1.0, ("modality",), (False, ["modality"])),  # an image rule alone
    (5.0, ("no-head", "small-image"), (False, ["model", "no-head", "small-image"])),  # model first
])
def test_decide_makes_no_tumour_decision_for_what_is_not_assessed(score, reasons, expected):
    labels = ["glioma", "meningioma", "notumor", "pituitary"]
    decision = decide(np.array([2.0, 0.0, 0.0, 0.0]), labels, temperature=1.0, threshold=0.5,
                      ood_score=score, ood_threshold=None if score is None else 2.0, image_reasons=reasons)
    in_distribution, why = expected
    assert decision.in_distribution is in_distribution and decision.ood_reasons == (why or [])
    assert decision.label == "glioma" and decision.tumour_probability > 0.5
    assert decision.tumour_detected is (None if in_distribution is False else True)
    assert decision.assessed is (in_distribution is not False)


def test_decide_and_the_evaluation_share_the_tumour_rule():
    # threshold inclusive, the same function on one image and on an array of them
    labels = ["glioma", "notumor"]
    logits = np.log(np.array([[0.3, 0.7], [0.31, 0.69]]))
    assert [decide(row, labels, temperature=1.0, threshold=0.3).tumour_detected for row in logits] == [True, True]
    assert list(tumour_probability(softmax(logits), labels) >= 0.3) == [True, True]
    assert decide(logits[0], labels, temperature=1.0, threshold=0.3000001).tumour_detected is False
