"""Live performance per model version, against readers' feedback (README, "Live performance").

Pure: ``performance_of(rows)`` takes the rows ``app.engine.records.feedback.confirmed_rows`` reads
(one per reading, joined to its prediction) and returns the report; ``performance_report(store)``
reads them and calls it. The figures:

- a *confirmed case* is a recorded prediction with at least one reader's finding. Several readers'
  findings on one prediction are combined by majority; a tie leaves that figure undecided for it
  (counted in ``disputed``), never guessed;
- *sensitivity* and *specificity* of the model's tumour decision (``tumour_detected``) against the
  readers' ``tumour_present``, over assessed predictions that made the decision;
- *class agreement*: the model's label is the readers' label, over assessed predictions with a label;
- each with its 95% Wilson score interval (``wilson_interval``);
- the expected calibration error of the tumour probability against the readers' finding
  (``expected_calibration_error``, ``ECE_BINS`` equal-width bins), over the same cases as the decision,
  with the bins themselves for a reliability diagram (``reliability_bins``);
- the confusion matrix of the model's label against the readers' (``confusion_matrix``), over the
  cases of class agreement: its diagonal is the agreement's successes, its total the trials.

Images not assessed (out of distribution) make no decision and name no class: they are counted
(``not_assessed``) and left out of every figure.

An HTTP route can serve the exporter's last report, ``app.engine.metrics.LIVE_PERFORMANCE.report``
(no database query; refreshed every ``BTD_PERFORMANCE_INTERVAL_S``), or a fresh one,
``await asyncio.to_thread(performance_report, request.app.state.records.store)``; both have the shape
``performance_of`` documents.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from statistics import NormalDist
from typing import Any

from app.engine.records.feedback import confirmed_rows
from app.engine.records.store import RecordStore

CONFIDENCE_LEVEL = 0.95
ECE_BINS = 10


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE_LEVEL) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (Wilson 1927; Newcombe 1998, method 3), without
    continuity correction; None for no trials."""
    if trials <= 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, trials]: {successes} of {trials}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, n, z2 = successes / trials, trials, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, trials: int) -> dict[str, Any]:
    """A proportion with its Wilson interval: ``value``, ``lower``, ``upper`` (None without trials),
    ``successes``, ``trials``."""
    interval = wilson_interval(successes, trials)
    return {"value": successes / trials if trials else None, "lower": interval[0] if interval else None,
            "upper": interval[1] if interval else None, "successes": successes, "trials": trials}


def reliability_bins(probabilities: Sequence[float], outcomes: Sequence[bool],
                     bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """The reliability diagram's bins: ``bins`` equal-width bins of the predicted probability (the first
    closed at 0, each other closed on the right), each with its ``lower`` and ``upper`` edge, its
    ``cases``, their ``mean_probability`` and the ``observed`` share of positive outcomes (both None
    for an empty bin). Every bin is listed, empty or not, so a chart keeps its axis."""
    if len(probabilities) != len(outcomes):
        raise ValueError("one outcome per probability")
    sums = [[0, 0.0, 0.0] for _ in range(bins)]  # per bin: [cases, sum p, sum outcome]
    for p, outcome in zip(probabilities, outcomes):
        cell = sums[max(0, min(bins - 1, math.ceil(p * bins) - 1))]
        cell[0] += 1
        cell[1] += p
        cell[2] += float(outcome)
    return [{"lower": b / bins, "upper": (b + 1) / bins, "cases": int(n),
             "mean_probability": s_p / n if n else None, "observed": s_y / n if n else None}
            for b, (n, s_p, s_y) in enumerate(sums)]


def calibration_error(cells: Sequence[Mapping[str, Any]]) -> float | None:
    """Binary ECE of ``reliability_bins``: the case-weighted mean of |observed frequency - mean
    probability|; None for no cases."""
    cases = sum(c["cases"] for c in cells)
    if not cases:
        return None
    return sum(c["cases"] * abs(c["observed"] - c["mean_probability"]) for c in cells if c["cases"]) / cases


def expected_calibration_error(probabilities: Sequence[float], outcomes: Sequence[bool],
                               bins: int = ECE_BINS) -> float | None:
    """Binary ECE over ``bins`` equal-width bins (``reliability_bins``, ``calibration_error``)."""
    return calibration_error(reliability_bins(probabilities, outcomes, bins))


def confusion_matrix(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Counts of (the model's label, the readers' label): ``labels`` (every label either named, sorted)
    and ``counts``, one row per model label and one column per readers' label, in that order."""
    counted = Counter(pairs)
    labels = sorted({label for pair in counted for label in pair})
    return {"labels": labels, "counts": [[counted[(model, readers)] for readers in labels] for model in labels]}


def majority(values: Iterable[Hashable]) -> Any:
    """The most frequent of ``values`` (Nones ignored); None when there is none or a tie for the most."""
    counts = Counter(v for v in values if v is not None).most_common(2)
    if not counts or (len(counts) == 2 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def _model_report(cases: list[tuple[Mapping[str, Any], bool | None, str | None, bool]], readings: int) -> dict[str, Any]:
    """``cases``: (the prediction, the readers' tumour finding, their label, whether they disputed it)."""
    tp = fn = tn = fp = disputed = not_assessed = 0
    labelled: list[tuple[str, str]] = []  # (the model's label, the readers')
    probabilities: list[float] = []
    outcomes: list[bool] = []
    for prediction, truth, label, tied in cases:
        disputed += tied
        if not prediction["assessed"]:
            not_assessed += 1
            continue
        if label is not None:
            labelled.append((prediction["label"], label))
        detected = prediction["tumour_detected"]
        if truth is not None and detected is not None:
            if truth:
                tp, fn = tp + detected, fn + (not detected)
            else:
                tn, fp = tn + (not detected), fp + detected
            if prediction["tumour_probability"] is not None:
                probabilities.append(float(prediction["tumour_probability"]))
                outcomes.append(bool(truth))
    reliability = reliability_bins(probabilities, outcomes)
    return {
        "confirmed": len(cases), "readings": readings, "not_assessed": not_assessed, "disputed": disputed,
        "sensitivity": proportion(tp, tp + fn), "specificity": proportion(tn, tn + fp),
        "class_agreement": proportion(sum(model == readers for model, readers in labelled), len(labelled)),
        "confusion": confusion_matrix(labelled),
        "calibration": {"ece": calibration_error(reliability), "bins": ECE_BINS, "cases": len(probabilities),
                        "reliability": reliability},
    }


def _findings(readings: list[Mapping[str, Any]]) -> tuple[bool | None, str | None, bool]:
    """The readers' tumour finding and label on one prediction, and whether they tied on either."""
    if len(readings) == 1:  # the common case, without counting
        return readings[0]["reader_tumour"], readings[0]["reader_label"], False
    tumours = [r["reader_tumour"] for r in readings]
    labels = [r["reader_label"] for r in readings]
    truth, label = majority(tumours), majority(labels)
    tied = ((truth is None and any(v is not None for v in tumours))
            or (label is None and any(v is not None for v in labels)))
    return truth, label, tied


def performance_of(rows: Iterable[Mapping[str, Any]], now: datetime | None = None) -> dict[str, Any]:
    """The report from readings joined to their predictions (keys: ``prediction_id``, ``model_version``,
    ``label``, ``tumour_probability``, ``tumour_detected``, ``assessed``, ``reader_label``,
    ``reader_tumour``). Its shape, per model version (figures with no case are None)::

        {"generated_at": "2026-12-07T10:00:00+00:00", "confidence_level": 0.95,
         "models": {"1.2.0": {
             "confirmed": 120,      # predictions with a reader's finding
             "readings": 131,       # findings (several readers may read one prediction)
             "not_assessed": 3,     # confirmed but not assessed (out of distribution): in no figure
             "disputed": 1,         # readers tied on the tumour or the class: left out of that figure
             "sensitivity": {"value": 0.93, "lower": 0.84, "upper": 0.97, "successes": 56, "trials": 60},
             "specificity": {...}, "class_agreement": {...},    # the same keys
             "confusion": {"labels": ["glioma", "notumor"],   # every label named, sorted
                           "counts": [[50, 2], [1, 60]]},     # rows: the model's label; columns: the readers'
             "calibration": {"ece": 0.04, "bins": 10, "cases": 116,
                             "reliability": [                 # every bin, empty or not
                                 {"lower": 0.0, "upper": 0.1, "cases": 40, "mean_probability": 0.03,
                                  "observed": 0.05}, ...]}}}}
    """
    by_prediction: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_prediction.setdefault(row["prediction_id"], []).append(row)
    cases: dict[str, list[tuple[Mapping[str, Any], bool | None, str | None, bool]]] = defaultdict(list)
    readings: Counter[str] = Counter()
    for group in by_prediction.values():
        version = group[0]["model_version"]
        cases[version].append((group[0], *_findings(group)))
        readings[version] += len(group)
    return {"generated_at": (now or datetime.now(timezone.utc)).isoformat(), "confidence_level": CONFIDENCE_LEVEL,
            "models": {version: _model_report(cases[version], readings[version]) for version in sorted(cases)}}


def performance_report(store: RecordStore, now: datetime | None = None) -> dict[str, Any]:
    """``performance_of`` the readings in ``store``: blocking, call it off the event loop. It reads
    every reading (about 0.2 s for 10,000 on the project's loaded 2-core machine, bench/bench_performance.py)."""
    return performance_of(confirmed_rows(store), now)
