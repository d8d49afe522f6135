"""``btd evaluate`` on ONNX files: the report files, and the comparison with a baseline model that
``btd quantize``'s accuracy change is read from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

from model_export import evaluate
from tests.export.synthetic_mri import write_image_folder, write_split_file
from tests.model_factory import build_model


@pytest.fixture
def data(tmp_path: Path) -> dict:
    paths = write_image_folder(tmp_path / "imgs", per_class=8, size=32)
    return {"data": tmp_path / "imgs", "split_file": write_split_file(tmp_path / "imgs", paths, tmp_path / "s.csv")}


def test_evaluate_reports_the_accuracy_change_against_a_baseline_model(data: dict, tmp_path: Path) -> None:
    model, baseline = build_model(tmp_path / "a.onnx", seed=1), build_model(tmp_path / "b.onnx", seed=2)
    report = evaluate.main(evaluate.EvalConfig(model=model, baseline=baseline, out=tmp_path / "eval", **data))
    alone = evaluate.main(evaluate.EvalConfig(model=baseline, out=tmp_path / "eval-b", **data))
    change = report["baseline"]
    assert change["accuracy"] == pytest.approx(alone["accuracy"])
    assert change["accuracy_change"] == pytest.approx(report["accuracy"] - alone["accuracy"])
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["baseline"]["accuracy_change"] == pytest.approx(change["accuracy_change"])
    assert f"change {change['accuracy_change']:+.4f}" in (tmp_path / "eval" / "report.md").read_text()
    predicted = np.loadtxt(tmp_path / "eval" / "predictions.csv", delimiter=",", skiprows=1, usecols=(3, 4, 5, 6))
    assert predicted.shape == (report["images"], 4)
    for image in ("confusion_matrix.png", "roc_curves.png"):
        assert (tmp_path / "eval" / image).read_bytes().startswith(b"\x89PNG")
