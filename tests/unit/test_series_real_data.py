"""The series rule on real series with the shipped INT8 model (bench/series_rule.py measures all of it):
every LGG test patient's FLAIR series is a tumour series, and the MNI152 template, a healthy brain read
by the NIfTI path, comes out tumour-free."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.core.series import aggregate
from model_export.data import shared_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import series_rule

MODEL = Path(__file__).resolve().parents[2] / "models" / "btd-resnet50.onnx"
pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not (shared_data_dir() / "lgg-tcga-flair" / "index.csv").is_file(),
                                 reason="../shared/data (lgg-tcga-flair) is absent"),
              pytest.mark.skipif(not MODEL.with_name("btd-resnet50-int8.onnx").is_file(),
                                 reason="the shipped INT8 model is absent")]


@pytest.fixture(scope="module")
def engine():
    from app.engine.engine import Engine, EngineOptions

    return Engine.load_single(MODEL, EngineOptions(variant="int8"))


def test_lgg_flair_test_patients_series_are_called_tumour(engine):
    series = {name: s for name, s in series_rule.lgg_series(shared_data_dir()).items() if name.startswith("flair/")}
    assert len(series) >= 20
    findings = [aggregate([engine.predict(Path(p).read_bytes()) for p, _ in slices]) for slices in series.values()]
    called = sum(bool(f.tumour_detected) for f in findings if f.assessed)
    assert called / len(findings) >= 0.95  # measured 21 of 22 (bench/series_rule.py)
    assert all(f.label != "notumor" for f in findings if f.tumour_detected)


def test_the_mni152_template_is_a_tumour_free_series(engine):
    nilearn = pytest.importorskip("nilearn.datasets", reason="nilearn (the dev extra) is not installed")
    from app.engine.series import SeriesLimits, predict_volume_sync

    result = predict_volume_sync(engine, Path(nilearn.MNI152_FILE_PATH).read_bytes(), SeriesLimits())
    assert len(result.slices) == 189 and result.ordering == "position"
    assert result.finding.assessed and result.finding.tumour_detected is False
    assert result.finding.slices_assessed >= 40  # the brain's middle; the ends are no-head / out of distribution
