"""The local Predictor (CLI mode): same core as the HTTP service, typed errors for bad input."""

import math

import cv2
import numpy as np
import pytest

from app.errors import InvalidImage, UnsupportedMediaType
from app.inference.predictor import Predictor
from app.inference.runner import ModelContractError
from app.settings import Settings
from tests.model_factory import LABELS, build_model


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor.load(build_model(tmp_path_factory.mktemp("m") / "model.onnx"))


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def test_predict_returns_probabilities_that_sum_to_one(predictor):
    img = np.random.default_rng(1).integers(0, 255, (96, 80), dtype=np.uint8)
    result = predictor.predict(_png(img))
    assert list(result["probabilities"]) == list(LABELS)
    assert math.isclose(sum(result["probabilities"].values()), 1.0, abs_tol=1e-9)
    assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["tumour_probability"] == pytest.approx(1 - result["probabilities"]["notumor"])
    assert result["tumour_detected"] == (result["tumour_probability"] >= result["threshold"])
    assert result["cam"] is None and "request_id" not in result
    assert predictor.metadata.labels == LABELS


def test_predict_grid_cam_has_feature_shape(predictor):
    img = np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8)
    cam = predictor.predict(_png(img), "image/png", cam="grid")["cam"]
    assert cam["format"] == "grid" and cam["shape"] == [8, 8]
    grid = np.array(cam["grid"])
    assert grid.shape == (8, 8) and grid.min() >= 0 and grid.max() <= 1


def test_predict_threshold_setting_overrides_model(tmp_path):
    predictor = Predictor.load(build_model(tmp_path / "m.onnx"), Settings(tumour_threshold=1.0))
    result = predictor.predict(_png(np.full((70, 70), 9, np.uint8)))
    assert result["threshold"] == 1.0 and result["tumour_detected"] is (result["tumour_probability"] >= 1.0)


def test_predict_rejects_text_with_415(predictor):
    with pytest.raises(UnsupportedMediaType):
        predictor.predict(b"hello, not an image")


def test_predict_rejects_truncated_png_with_400(predictor):
    with pytest.raises(InvalidImage):
        predictor.predict(_png(np.zeros((80, 80), np.uint8))[:60])


def test_predict_rejects_unknown_cam_mode(predictor):
    with pytest.raises(ValueError):
        predictor.predict(_png(np.zeros((80, 80), np.uint8)), cam="jpeg")


def test_load_rejects_missing_model_file(tmp_path):
    with pytest.raises(ModelContractError, match="not found"):
        Predictor.load(tmp_path / "absent.onnx")
