"""The validation baseline (app.core.baseline), drift against it (app.engine.monitoring.drift) and the
monitor that refreshes it from the records (app.engine.monitoring.monitor)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from prometheus_client import REGISTRY

from app.core.baseline import Baseline, SignalBaseline, build_baseline, intensity_ratio, signal_values
from app.core.decision import NOT_ASSESSED
from app.engine.monitoring.drift import DriftRule, drift_history, ks_at_edges, psi, window_drift
from app.engine.monitoring.monitor import DriftMonitor, MonitorOptions
from app.engine.records.store import RecordStore

LABELS = ("glioma", "meningioma", "notumor", "pituitary")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def answers(n: int, seed: int = 0, *, tumour_shift: float = 0.0, label: str | None = None) -> list[dict]:
    """Answers like a validation split's: a class mix, tumour probabilities, OOD scores, intensities."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        chosen = label or LABELS[int(rng.integers(len(LABELS)))]
        tumour = float(np.clip(rng.beta(2, 5) + tumour_shift, 0, 1))
        out.append(signal_values(label=chosen, assessed=True, tumour_probability=tumour,
                                 ood_score=float(rng.gamma(5, 200)),
                                 percentiles=(0.0, float(rng.uniform(0, 20)), 60.0, 150.0, 200.0)))
    return out


def records(values: list[dict], start: datetime = T0) -> list[dict]:
    """Prediction-record-like rows holding ``values`` (what drift reads of a record)."""
    rows = []
    for i, v in enumerate(values):
        p05 = v["intensity"] * 200.0 if v["intensity"] is not None else None
        rows.append({"recorded_at": start + timedelta(seconds=i), "label": v["class_mix"],
                     "assessed": v["class_mix"] != NOT_ASSESSED, "tumour_probability": v["tumour_probability"],
                     "ood_score": v["ood_score"], "intensity_p01": 0.0, "intensity_p05": p05,
                     "intensity_p50": 60.0, "intensity_p95": 150.0, "intensity_p99": 200.0})
    return rows


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    values = answers(2000, seed=1)
    return build_baseline(values, LABELS, percentiles=[(0, 5, 60, 150, 200)] * len(values), source={"split": "val"})


def test_baseline_round_trips_through_json(baseline):
    again = Baseline.from_json(baseline.to_json())
    assert again == baseline
    assert set(again.signals) == {"class_mix", "tumour_probability", "ood_score", "intensity"}
    assert again.signals["class_mix"].categories == (*LABELS, NOT_ASSESSED)
    assert again.intensity["p50"] == 60.0


def test_baseline_bins_hold_a_tenth_each(baseline):
    tumour = baseline.signals["tumour_probability"]
    assert len(tumour.edges) == 9
    assert sum(tumour.shares) == pytest.approx(1.0, abs=1e-5)
    assert all(s == pytest.approx(0.1, abs=0.002) for s in tumour.shares)


def test_baseline_merges_tied_edges():
    tied = SignalBaseline.of_values([0.0] * 70 + list(np.linspace(0.1, 1, 30)))
    assert len(tied.edges) == len(set(tied.edges)) < 9
    assert tied.shares[0] == pytest.approx(0.7)


def test_malformed_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline"):
        Baseline.from_json('{"version": 1, "images": 3}')
    with pytest.raises(ValueError, match="version"):
        Baseline.from_json('{"version": 99, "images": 3, "signals": {}}')
    bad = ('{"version": 1, "images": 3, "signals": {"ood_score": {"kind": "bins", "shares": [1.0], "count": 3, '
           '"edges": [1.0, 2.0]}}}')
    with pytest.raises(ValueError, match="shares"):
        Baseline.from_json(bad)


def test_intensity_ratio_is_the_same_at_any_bit_depth():
    eight_bit = (0.0, 10.0, 60.0, 150.0, 200.0)
    assert intensity_ratio(eight_bit) == pytest.approx(0.05)
    assert intensity_ratio(tuple(v * 16 for v in eight_bit)) == pytest.approx(0.05)
    assert intensity_ratio((0.0, 0.0, 0.0, 0.0, 0.0)) is None
    assert intensity_ratio(None) is None


def test_not_assessed_answers_count_apart_in_the_class_mix():
    value = signal_values(label="glioma", assessed=False, tumour_probability=0.9, ood_score=9e9, percentiles=None)
    assert value["class_mix"] == NOT_ASSESSED
    assert value["intensity"] is None


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    shares = [0.25, 0.25, 0.25, 0.25]
    assert psi(shares, [50, 50, 50, 50]) == pytest.approx(0.0)
    small, large = psi(shares, [60, 50, 50, 40]), psi(shares, [150, 30, 10, 10])
    assert 0 < small < 0.1
    assert large > 0.25
    assert psi(shares, [0, 0, 0, 0]) is None


def test_psi_of_an_empty_bin_is_finite():
    assert np.isfinite(psi([0.5, 0.5], [100, 0]))


def test_ks_is_the_largest_gap_of_the_cumulative_shares():
    assert ks_at_edges([0.5, 0.5], [50, 50]) == pytest.approx(0.0)
    assert ks_at_edges([0.25, 0.25, 0.5], [100, 0, 0]) == pytest.approx(0.75)


def test_traffic_like_the_baseline_raises_no_alert(baseline):
    drift = window_drift(baseline, records(answers(200, seed=2)), DriftRule())
    assert not drift.alert
    assert all(s.psi is not None and s.psi < 0.1 for s in drift.signals.values())


def test_shifted_tumour_probabilities_raise_the_alert(baseline):
    drift = window_drift(baseline, records(answers(200, seed=3, tumour_shift=0.4)), DriftRule())
    assert drift.alert
    assert drift.signals["tumour_probability"].over
    assert drift.signals["tumour_probability"].ks > 0.3
    assert not drift.signals["class_mix"].over


def test_one_class_only_raises_the_class_mix_alert(baseline):
    drift = window_drift(baseline, records(answers(200, seed=4, label="glioma")), DriftRule())
    assert drift.signals["class_mix"].over
    assert drift.signals["class_mix"].ks is None  # categorical


def test_too_few_records_raise_no_alert(baseline):
    drift = window_drift(baseline, records(answers(99, seed=5, label="glioma")), DriftRule(min_records=100))
    assert drift.signals["class_mix"].psi > 0.25
    assert not drift.alert


def test_history_cuts_consecutive_windows_back_from_the_newest(baseline):
    rows = records(answers(450, seed=6))
    windows = drift_history(baseline, rows, DriftRule(window=200, min_records=100), windows=10)
    assert [w.records for w in windows] == [200, 200]  # the oldest 50 make no full window
    assert windows[-1].end == rows[-1]["recorded_at"]
    partial = drift_history(baseline, rows[:150], DriftRule(window=200, min_records=100), windows=10)
    assert [w.records for w in partial] == [150]
    assert len(drift_history(baseline, rows, DriftRule(window=100, min_records=100), windows=2)) == 2


def test_drift_rule_needs_a_window_holding_its_minimum():
    with pytest.raises(ValueError):
        DriftRule(min_records=300, window=200)


# -- the monitor, over a real records database ---------------------------------------------------

def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_monitor_reads_the_records_and_sets_the_gauges(tmp_path, baseline):
    from sqlalchemy import insert

    from app.engine.records.schema import RECORDS

    store = RecordStore(f"sqlite:///{tmp_path / 'records.db'}")
    store.migrate()
    common = {"request_id": "r", "transport": "http-v1", "model_name": "m", "model_sha256": "a" * 64,
              "probabilities": {}, "threshold": 0.5}
    calm, shifted = records(answers(200, seed=7)), records(answers(200, seed=8, label="glioma"), T0 + timedelta(1))
    with store.engine.begin() as connection:
        connection.execute(insert(RECORDS), [{**common, **r, "model_version": "9.9.9"} for r in calm + shifted])
        connection.execute(insert(RECORDS), [{**common, **r, "model_version": "other"} for r in calm])
    monitor = DriftMonitor("9.9.9", baseline, store, MonitorOptions(rule=DriftRule(), history=5))
    report = monitor.refresh()
    assert report["status"] == "alert" and report["alert"] and report["window_records"] == 200
    mix = report["signals"]["class_mix"]
    assert mix["over_threshold"] and mix["threshold"] == 0.25 and mix["window"] == 200
    assert [p["records"] for p in mix["history"]] == [200, 200]
    assert mix["history"][0]["psi"] < 0.25 < mix["history"][1]["psi"]
    assert gauge("btd_drift_over_threshold", model_version="9.9.9", signal="class_mix") == 1
    assert gauge("btd_drift_psi", model_version="9.9.9", signal="class_mix") == pytest.approx(mix["psi"], abs=1e-3)
    assert gauge("btd_drift_window_records", model_version="9.9.9") == 200
    monitor.close()

    # After a hot reload the monitor measures the model now served: "other" has only calm records.
    live = {"version": "9.9.9"}
    following = DriftMonitor("9.9.9", baseline, RecordStore(store.url), MonitorOptions(rule=DriftRule(), history=5),
                             live_model=lambda: (live["version"], baseline))
    assert following.refresh()["status"] == "alert"
    live["version"] = "other"
    report = following.refresh()
    assert report["status"] == "ok" and following.model_version == "other" and report["window_records"] == 200
    following.close()


def test_monitor_says_why_it_cannot_measure(tmp_path, baseline):
    assert DriftMonitor("1", None, None).refresh()["status"] == "no-baseline"
    assert DriftMonitor("1", baseline, None).refresh()["status"] == "no-records"
    fresh = RecordStore(f"sqlite:///{tmp_path / 'never-migrated.db'}")
    report = DriftMonitor("1", baseline, fresh).refresh()
    assert report["status"] == "no-records" and "not created yet" in report["reason"]
    broken = RecordStore(f"sqlite:///{tmp_path / 'no-such-dir' / 'btd.db'}")
    report = DriftMonitor("1", baseline, broken).refresh()
    assert report["status"] == "unavailable" and "cannot be read" in report["reason"]
    empty = RecordStore(f"sqlite:///{tmp_path / 'empty.db'}")
    empty.migrate()
    assert DriftMonitor("1", baseline, empty).refresh()["status"] == "no-records"


def test_settings_make_the_drift_rule_with_a_full_window_by_default():
    from app.settings import Settings

    assert Settings().monitor_options().rule == DriftRule(psi_threshold=0.25, min_records=200, window=200)
    assert Settings(drift_window=50).monitor_options().rule.min_records == 50
    assert Settings(drift_window=50, drift_min_records=20).monitor_options().rule.min_records == 20
    with pytest.raises(ValueError, match="BTD_DRIFT_MIN_RECORDS"):
        Settings(drift_window=50, drift_min_records=60)
