"""The engine at batch 1 (``Engine.load_single``, what `btd predict` runs locally): typed results, typed errors for bad input."""

import math

import cv2
import numpy as np
import pytest

from app.core.errors import InvalidImage, UnsupportedMediaType
from app.core.model import ModelContractError
from app.engine.engine import Engine, EngineOptions
from app.engine.runner import RuntimeOptions
from app.settings import Settings
from tests.model_factory import LABELS, build_model

HEAD = np.zeros((120, 110), np.uint8)
cv2.ellipse(HEAD, (55, 60), (40, 50), 0, 0, 360, 180, -1)  # a bright head on a dark background


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Engine.load_single(build_model(tmp_path_factory.mktemp("m") / "model.onnx"))


def _png(img: np.ndarray) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def test_predict_returns_probabilities_that_sum_to_one(predictor):
    result = predictor.predict(_png(HEAD))
    assert list(result.probabilities) == list(LABELS)
    assert math.isclose(sum(result.probabilities.values()), 1.0, abs_tol=1e-9)
    assert result.label == max(result.probabilities, key=result.probabilities.get)
    assert result.tumour_probability == pytest.approx(1 - result.probabilities["notumor"])
    assert result.tumour_detected == (result.tumour_probability >= result.threshold)
    assert result.cam is None and "request_id" not in result.to_dict()
    assert result.in_distribution is None and result.ood_score is None  # the model cannot say; no image rule fired
    assert predictor.metadata.labels == LABELS
    assert list(predictor.runner.buckets) == [1]  # one image at a time: only batch 1 is opened


def test_predict_grid_cam_has_feature_shape(predictor):
    cam = predictor.predict(_png(HEAD), "image/png", cam="grid").cam
    assert cam.format == "grid" and cam.shape == [8, 8]
    grid = np.array(cam.grid)
    assert grid.shape == (8, 8) and grid.min() >= 0 and grid.max() <= 1


def test_predict_threshold_setting_overrides_model(tmp_path):
    predictor = Engine.load_single(build_model(tmp_path / "m.onnx"), Settings(tumour_threshold=1.0).engine_options())
    result = predictor.predict(_png(HEAD))
    assert result.threshold == 1.0 and result.tumour_detected is (result.tumour_probability >= 1.0)


def test_predictor_uses_the_runtime_options_it_is_given(tmp_path):
    options = EngineOptions(runtime=RuntimeOptions(intra_op_threads=1, buckets=(1, 2, 4)))
    predictor = Engine.load_single(build_model(tmp_path / "m.onnx"), options)
    assert predictor.runner.sessions[1].get_session_options().intra_op_num_threads == 1


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
        Engine.load_single(tmp_path / "absent.onnx")
