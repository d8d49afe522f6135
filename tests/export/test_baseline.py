"""``btd baseline``: the validation split measured the service's way and stamped into the model's
metadata, the graph untouched."""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import pytest

from app.core.baseline import SIGNALS
from app.core.contract import META_BASELINE
from app.core.model import ModelFile, file_sha256
from app.engine.monitoring.drift import RECORD_COLUMNS, rows_signals
from app.engine.records.store import RecordStore
from model_export.baseline import graph_sha256, measure
from model_export.cli import main as btd
from model_export.data import load_samples, select
from tests.api.helpers import running_app
from tests.export.synthetic_mri import write_image_folder, write_split_file
from tests.model_factory import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    paths = write_image_folder(root, per_class=8, size=128)
    return root, write_split_file(root, paths, root / "splits.csv")


@pytest.fixture
def model(tmp_path) -> Path:
    return build_model(tmp_path / "m.onnx", ood_threshold=0.5)


def test_btd_baseline_stamps_the_validation_split_and_keeps_the_graph(model, data):
    root, splits = data
    graph_before = graph_sha256(onnx.load(str(model)))
    assert ModelFile.load(model).baseline is None
    assert btd(["baseline", str(model), "--data", str(root), "--split-file", str(splits)]) == 0
    assert graph_sha256(onnx.load(str(model))) == graph_before
    baseline = ModelFile.load(model).baseline
    assert baseline is not None and set(baseline.signals) == set(SIGNALS)
    assert baseline.images == 8  # 2 of 8 per class are val
    assert baseline.source["split"] == "val" and baseline.source["model_graph_sha256"] == graph_before
    assert baseline.signals["class_mix"].count == 8 and baseline.signals["ood_score"].count == 8
    assert set(baseline.intensity) == {"p01", "p05", "p50", "p95", "p99"}


def test_btd_baseline_out_leaves_the_source_as_it_was(model, data, tmp_path):
    root, splits = data
    before = file_sha256(model)
    out = tmp_path / "stamped.onnx"
    assert btd(["baseline", str(model), "--data", str(root), "--split-file", str(splits), "--out", str(out)]) == 0
    assert file_sha256(model) == before and META_BASELINE not in {p.key for p in onnx.load(str(model)).metadata_props}
    assert ModelFile.load(out).baseline is not None


def test_btd_baseline_of_an_empty_split_is_a_clear_error(model, data, caplog):
    root, splits = data
    assert btd(["baseline", str(model), "--data", str(root), "--split-file", str(splits), "--split", "nope"]) == 2
    assert "no images in split 'nope'" in caplog.text


def test_the_baseline_holds_what_the_service_records_for_the_same_images(model, data, tmp_path):
    """The same images through btd baseline's measure and through POST /v1/predict: the signal
    values of the records the service writes are the values the baseline is made of."""
    root, splits = data
    samples = select(load_samples(root, splits), "val")
    measured, _ = measure(ModelFile.load(model), samples)
    with running_app(model, records_dir=tmp_path / "records") as client:
        for sample in samples:
            kind = "image/png" if sample.path.suffix == ".png" else "image/jpeg"
            response = client.post("/v1/predict", content=sample.path.read_bytes(), headers={"Content-Type": kind})
            assert response.status_code == 200
    url = f"sqlite:///{tmp_path / 'records' / 'btd.db'}"
    with RecordStore(url) as store:
        deadline = time.monotonic() + 10
        while store.count() < len(samples) and time.monotonic() < deadline:
            time.sleep(0.05)
        recorded = rows_signals(store.recent(len(samples), RECORD_COLUMNS))
    assert len(recorded) == len(measured)
    for want, got in zip(measured, recorded):
        assert got["class_mix"] == want["class_mix"]
        for name in ("tumour_probability", "ood_score", "intensity"):
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
