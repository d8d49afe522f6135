"""Live performance against readers' feedback (app/engine/monitoring): Wilson intervals and the
calibration error against known values, the report's counting rules, its Prometheus gauges and the
exporter that refreshes them from the records database."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from app.engine import metrics
from app.engine.monitoring.exporter import PerformanceExporter
from app.engine.monitoring.performance import (
    confusion_matrix,
    expected_calibration_error,
    majority,
    performance_of,
    performance_report,
    reliability_bins,
    wilson_interval,
)
from app.engine.records.feedback import Finding, save_feedback
from app.engine.records.store import RecordStore
from tests.unit.test_records import row


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
@pytest.mark.parametrize(("successes", "trials", "lower", "upper"), [
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombes_table(successes: int, trials: int, lower: float, upper: float):
    assert wilson_interval(successes, trials) == pytest.approx((lower, upper), abs=5e-5)


def test_wilson_interval_matches_scipy_and_its_edges():
    stats = pytest.importorskip("scipy.stats")
    for successes, trials in ((0, 1), (1, 1), (7, 9), (50, 100), (999, 1000)):
        ci = stats.binomtest(successes, trials).proportion_ci(method="wilson")
        assert wilson_interval(successes, trials) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert wilson_interval(0, 0) is None
    lower, upper = wilson_interval(8, 10, confidence=0.99)
    assert lower < wilson_interval(8, 10)[0] and upper > wilson_interval(8, 10)[1]
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_expected_calibration_error_of_known_cases():
    # Bin [0, 0.1]: mean p 0.1, frequency 0.5 -> 0.4; bin (0.8, 0.9]: 0.9 against 1 -> 0.1; half the cases each.
    assert expected_calibration_error([0.1, 0.1, 0.9, 0.9], [False, True, True, True]) == pytest.approx(0.25)
    # Perfectly calibrated bins; 0 and 1 fall in the first and last bins.
    assert expected_calibration_error([0.0, 0.0, 1.0, 0.25, 0.25, 0.25, 0.25],
                                      [False, False, True, True, False, False, False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.95], [False]) == pytest.approx(0.95)
    assert expected_calibration_error([], []) is None
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [])


def test_reliability_bins_list_every_bin_with_its_cases_mean_and_observed_share():
    cells = reliability_bins([0.0, 0.1, 0.15, 0.2, 0.95, 1.0], [False, True, False, True, True, True], bins=4)
    assert [(c["lower"], c["upper"]) for c in cells] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert [c["cases"] for c in cells] == [4, 0, 0, 2]
    assert cells[0]["mean_probability"] == pytest.approx(0.1125) and cells[0]["observed"] == pytest.approx(0.5)
    assert cells[1]["mean_probability"] is None and cells[1]["observed"] is None  # empty: no share, not 0
    assert cells[3]["mean_probability"] == pytest.approx(0.975) and cells[3]["observed"] == 1.0
    # The ECE is their case-weighted gap: (4 * |0.5 - 0.1125| + 2 * |1 - 0.975|) / 6.
    assert expected_calibration_error([0.0, 0.1, 0.15, 0.2, 0.95, 1.0], [False, True, False, True, True, True],
                                      bins=4) == pytest.approx((4 * 0.3875 + 2 * 0.025) / 6)
    assert [c["cases"] for c in reliability_bins([], [])] == [0] * 10
    with pytest.raises(ValueError):
        reliability_bins([0.5], [])


def test_confusion_matrix_rows_are_the_models_labels_and_columns_the_readers():
    matrix = confusion_matrix([("glioma", "glioma"), ("glioma", "meningioma"), ("notumor", "glioma"),
                               ("glioma", "glioma")])
    assert matrix == {"labels": ["glioma", "meningioma", "notumor"], "counts": [[2, 1, 0], [0, 0, 0], [1, 0, 0]]}
    assert confusion_matrix([]) == {"labels": [], "counts": []}


def test_majority_leaves_ties_undecided():
    assert majority([True, True, False]) is True
    assert majority([True, False]) is None
    assert majority([None, "glioma"]) == "glioma"
    assert majority([None]) is None


def reading(prediction_id: int, model_label: str, detected: bool | None, probability: float | None,
            reader_label: str | None, reader_tumour: bool | None, *, version: str = "2.0", assessed: bool = True):
    return {"prediction_id": prediction_id, "model_version": version, "label": model_label,
            "tumour_probability": probability, "tumour_detected": detected, "assessed": assessed,
            "reader_label": reader_label, "reader_tumour": reader_tumour}


def test_the_report_counts_each_prediction_once_by_its_readers_majority():
    rows = [
        reading(1, "glioma", True, 0.9, "glioma", True),           # true positive, agree
        reading(2, "glioma", True, 0.8, "meningioma", True),       # true positive, disagree on the class
        reading(3, "notumor", False, 0.2, "pituitary", True),      # false negative
        reading(4, "notumor", False, 0.1, "notumor", False),       # true negative ...
        reading(4, "notumor", False, 0.1, "notumor", False),       # ... read twice: one case
        reading(4, "notumor", False, 0.1, "glioma", True),         # ... outvoted
        reading(5, "glioma", True, 0.7, None, False),              # false positive, no class given
        reading(6, "glioma", True, 0.6, "glioma", True),           # readers tied: disputed, in no figure
        reading(6, "glioma", True, 0.6, "notumor", False),
        reading(7, "glioma", None, 0.95, "glioma", True, assessed=False),  # not assessed: in no figure
        reading(8, "glioma", True, 0.9, "glioma", True, version="1.0"),
    ]
    report = performance_of(rows)
    assert set(report["models"]) == {"1.0", "2.0"} and report["confidence_level"] == 0.95
    model = report["models"]["2.0"]
    assert (model["confirmed"], model["readings"], model["not_assessed"], model["disputed"]) == (7, 10, 1, 1)
    assert model["sensitivity"] == {"value": 2 / 3, "lower": pytest.approx(wilson_interval(2, 3)[0]),
                                    "upper": pytest.approx(wilson_interval(2, 3)[1]), "successes": 2, "trials": 3}
    assert (model["specificity"]["successes"], model["specificity"]["trials"]) == (1, 2)
    assert (model["class_agreement"]["successes"], model["class_agreement"]["trials"]) == (2, 4)  # cases 1-4
    expected_ece = expected_calibration_error([0.9, 0.8, 0.2, 0.1, 0.7], [True, True, True, False, False])
    calibration = model["calibration"]
    assert (calibration["ece"], calibration["bins"], calibration["cases"]) == (pytest.approx(expected_ece), 10, 5)
    assert calibration["reliability"] == reliability_bins([0.9, 0.8, 0.2, 0.1, 0.7], [True, True, True, False, False])
    # Rows: the model's label; columns: the readers'. Cases 1-4 (case 5 named no class): the class agreement's.
    assert model["confusion"] == {"labels": ["glioma", "meningioma", "notumor", "pituitary"],
                                  "counts": [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]}
    other = report["models"]["1.0"]
    assert other["specificity"] == {"value": None, "lower": None, "upper": None, "successes": 0, "trials": 0}
    assert performance_of([])["models"] == {}


def test_the_gauges_show_the_last_report_with_the_model_version_as_only_label():
    report = performance_of([reading(1, "glioma", True, 0.9, "glioma", True, version="9.9-test"),
                             reading(2, "glioma", True, 0.9, "glioma", True, version="9.9-test")])
    metrics.LIVE_PERFORMANCE.update(report, 1_700_000_000.0)
    sample = REGISTRY.get_sample_value
    labels = {"model_version": "9.9-test"}
    assert sample("btd_live_confirmed_cases", labels) == 2
    assert sample("btd_live_sensitivity", labels) == 1.0
    assert sample("btd_live_sensitivity_lower", labels) == pytest.approx(wilson_interval(2, 2)[0])
    assert sample("btd_live_class_agreement_upper", labels) == 1.0
    assert sample("btd_live_specificity", labels) is None  # no reader found no tumour: no sample, not 0
    assert sample("btd_live_performance_updated_timestamp_seconds") == 1_700_000_000.0
    text = generate_latest().decode()
    assert "# TYPE btd_live_specificity gauge" in text
    for line in text.splitlines():
        if line.startswith("btd_live_") and "{" in line:
            assert line.split("{")[1].split("}")[0].startswith('model_version="'), line
            assert "," not in line.split("{")[1].split("}")[0], line  # the only label
    metrics.LIVE_PERFORMANCE.update(performance_of([]), 1_700_000_060.0)
    assert sample("btd_live_confirmed_cases", labels) is None  # a version gone from the records goes


def test_the_exporter_refreshes_the_gauges_from_the_database(tmp_path: Path, caplog):
    store = RecordStore(f"sqlite:///{tmp_path / 'btd.db'}")
    store.migrate()
    store.insert([row("a"), row("b"), row("c")])
    save_feedback(store, Finding("glioma"), request_id="a", reader_id="r1")
    save_feedback(store, Finding("notumor"), request_id="b")
    assert performance_report(store)["models"]["0.0.1"]["confirmed"] == 2
    exporter = PerformanceExporter(store, interval_s=60)
    assert exporter.refresh()
    labels = {"model_version": "0.0.1"}
    assert REGISTRY.get_sample_value("btd_live_confirmed_cases", labels) == 2
    assert REGISTRY.get_sample_value("btd_live_sensitivity", labels) == 1.0  # the row's model calls a tumour
    assert REGISTRY.get_sample_value("btd_live_specificity", labels) == 0.0

    def down(_store):
        raise OSError("database down")

    exporter.report = down
    with caplog.at_level(logging.WARNING, logger="app.monitoring"):
        assert not exporter.refresh() and not exporter.refresh()
    assert len([r for r in caplog.records if "not refreshed" in r.getMessage()]) == 1  # once per outage
    assert REGISTRY.get_sample_value("btd_live_confirmed_cases", labels) == 2  # the last figures stay
    exporter.close()


def test_the_exporter_thread_waits_for_the_database_then_refreshes(tmp_path: Path):
    store = RecordStore(f"sqlite:///{tmp_path / 'btd.db'}")
    ready = []
    exporter = PerformanceExporter(store, interval_s=0.05, ready=lambda: bool(ready))
    exporter.start()
    try:
        time.sleep(0.3)
        assert exporter.refreshed == 0  # not migrated yet: no refresh, no warning
        store.migrate()
        ready.append(True)
        deadline = time.monotonic() + 10
        while exporter.refreshed == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exporter.refreshed >= 1
    finally:
        exporter.close()
