"""Drift of recent answers against the model's validation baseline (``app.core.baseline``): pure
functions of the baseline and a list of prediction records, no database, no metrics.

Per signal (class mix, tumour probability, OOD score, input intensity) the window's values are
binned with the baseline's bins and compared with the baseline's shares by the population
stability index, PSI = sum over bins of (a - e) * ln(a / e), a and e the window's and the
baseline's shares (each floored at ``SHARE_FLOOR`` so an empty bin counts as rare, not impossible).
For a continuous signal the Kolmogorov-Smirnov statistic is also given, read at the baseline's bin
edges (the largest gap between the two cumulative shares there: a lower bound of the full statistic).

The alert rule (``DriftRule``, README "Monitoring"): drift is alerted when the window holds at least
``min_records`` answers and any signal's PSI is over ``psi_threshold`` (default 0.25: the usual
"significant shift"; 0.1 to 0.25 is a moderate one) and ``min_records`` defaults to the whole
window (200). Sampling noise sets those defaults (``bench/drift_noise.py``): on 300 random draws from
400 grouped-test answers of the shipped INT8 model (a population it was validated on), the largest PSI of the four signals had a
median of 0.12 and a 95th percentile of 0.18 at 200 answers (0.3% of draws over 0.25), but 0.19 and
0.31 at 100 answers (18% over 0.25): a half window is too noisy to alert on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from app.core.baseline import CONTINUOUS, SIGNALS, Baseline, SignalBaseline, SignalValue, signal_values
from app.engine.records.rows import PERCENTILE_COLUMNS

SHARE_FLOOR = 1e-4
DEFAULT_PSI_THRESHOLD = 0.25
DEFAULT_WINDOW = 200
DEFAULT_MIN_RECORDS = DEFAULT_WINDOW  # a full window: see the module's docstring
# The record columns drift reads (``app.engine.records.schema``).
RECORD_COLUMNS = ("recorded_at", "label", "assessed", "tumour_probability", "ood_score", *PERCENTILE_COLUMNS)


@dataclass(frozen=True)
class DriftRule:
    """When drift is alerted: at least ``min_records`` answers in a window of the last ``window`` and
    a PSI over ``psi_threshold`` on any signal."""

    psi_threshold: float = DEFAULT_PSI_THRESHOLD
    min_records: int = DEFAULT_MIN_RECORDS
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.psi_threshold <= 0 or self.min_records < 1 or self.window < self.min_records:
            raise ValueError("drift rule: psi_threshold > 0 and 1 <= min_records <= window")


def psi(expected: Sequence[float], counts: Sequence[int]) -> float | None:
    """Population stability index of ``counts`` (the window) against ``expected`` shares (the
    baseline); None when the window has no value."""
    n = float(np.sum(counts))
    if n <= 0:
        return None
    a = np.maximum(np.asarray(counts, dtype=np.float64) / n, SHARE_FLOOR)
    e = np.maximum(np.asarray(expected, dtype=np.float64), SHARE_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_at_edges(expected: Sequence[float], counts: Sequence[int]) -> float | None:
    """The largest gap between the cumulative shares of the window and the baseline at the bin edges."""
    n = float(np.sum(counts))
    if n <= 0:
        return None
    gap = np.cumsum(np.asarray(counts, dtype=np.float64) / n) - np.cumsum(np.asarray(expected, dtype=np.float64))
    return float(np.max(np.abs(gap[:-1]))) if gap.size > 1 else 0.0


@dataclass(frozen=True)
class SignalDrift:
    signal: str
    psi: float | None  # None: no answer in the window had this signal
    ks: float | None  # continuous signals only
    records: int  # answers in the window with a value for this signal
    over: bool  # this signal breaks the rule

    def to_dict(self) -> dict[str, Any]:
        return {"psi": _round(self.psi), "ks": _round(self.ks), "records": self.records, "over_threshold": self.over}


@dataclass(frozen=True)
class DriftWindow:
    """One window's drift: its answers, the time of its last one, each signal's figures, the verdict."""

    records: int
    end: datetime | None
    signals: dict[str, SignalDrift]
    alert: bool


def rows_signals(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, SignalValue]]:
    """Prediction records (dicts with ``RECORD_COLUMNS``) -> each one's signal values."""
    return [signal_values(label=r["label"], assessed=bool(r["assessed"]), tumour_probability=r["tumour_probability"],
                          ood_score=r["ood_score"], percentiles=[r.get(c) for c in PERCENTILE_COLUMNS])
            for r in rows]


def signal_drift(name: str, baseline: SignalBaseline, values: Sequence[SignalValue], rule: DriftRule,
                 window: int) -> SignalDrift:
    counts = baseline.histogram(values)
    value = psi(baseline.shares, counts)
    ks = ks_at_edges(baseline.shares, counts) if name in CONTINUOUS else None
    over = window >= rule.min_records and value is not None and value > rule.psi_threshold
    return SignalDrift(name, value, ks, int(counts.sum()), over)


def window_drift(baseline: Baseline, rows: Sequence[Mapping[str, Any]], rule: DriftRule) -> DriftWindow:
    """The drift of one window of records (any order) against ``baseline`` under ``rule``."""
    answers = rows_signals(rows)
    signals = {name: signal_drift(name, baseline.signals[name], [a[name] for a in answers], rule, len(rows))
               for name in SIGNALS if name in baseline.signals}
    end = max((r["recorded_at"] for r in rows if r.get("recorded_at") is not None), default=None)
    return DriftWindow(len(rows), end, signals, any(s.over for s in signals.values()))


def drift_history(baseline: Baseline, rows: Sequence[Mapping[str, Any]], rule: DriftRule,
                  windows: int) -> list[DriftWindow]:
    """Drift over time: ``rows`` (oldest first) cut into consecutive windows of ``rule.window`` records
    counted back from the newest, at most ``windows`` of them, oldest first. The last is the current
    sliding window (it may hold fewer than ``rule.window``; older windows are always full)."""
    out = []
    end = len(rows)
    while end > 0 and len(out) < windows:
        start = max(0, end - rule.window)
        if out and end - start < rule.window:
            break  # a partial window only as the newest one
        out.append(window_drift(baseline, rows[start:end], rule))
        end = start
    return out[::-1]


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)
