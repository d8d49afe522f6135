"""The monitor: every ``interval_s`` a thread reads the newest prediction records of the loaded model
version, measures drift against the model's baseline (``drift``), sets the drift gauges and keeps
the report that ``GET /v1/monitoring`` returns. Nothing here runs on the request path: the endpoint
reads the last report.

Drift over time is computed from the records themselves (consecutive windows counted back from the
newest), not kept in the process: every replica reading the same database answers alike, and a
restart loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.core.baseline import Baseline
from app.engine import metrics
from app.engine.monitoring.drift import RECORD_COLUMNS, DriftRule, DriftWindow, drift_history
from app.engine.records.store import RecordStore, safe_url

log = logging.getLogger("app.monitoring")

DEFAULT_INTERVAL_S = 60.0
DEFAULT_HISTORY = 24  # windows of drift over time in the report


@dataclass(frozen=True)
class MonitorOptions:
    rule: DriftRule = field(default_factory=DriftRule)
    interval_s: float = DEFAULT_INTERVAL_S
    history: int = DEFAULT_HISTORY


class DriftMonitor:
    """Drift of one loaded model (``model_version``, its ``baseline``) over the records in ``store``
    (None: records are off, so drift cannot be measured)."""

    def __init__(self, model_version: str, baseline: Baseline | None, store: RecordStore | None,
                 options: MonitorOptions | None = None, clock: Callable[[], float] = time.time,
                 live_model: Callable[[], tuple[str, Baseline | None]] | None = None) -> None:
        self.model_version = model_version
        self.baseline = baseline
        # The model being served now (version, baseline), read at every refresh: after a hot reload
        # (app.engine.reload) drift is measured for the new model against its own baseline.
        self.live_model = live_model
        self.store = store
        self.options = options or MonitorOptions()
        self.clock = clock
        self._report: dict[str, Any] = self._status("pending", "drift has not been measured yet")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # -- the report -------------------------------------------------------------------------------

    @property
    def report(self) -> dict[str, Any]:
        """The last drift report (the ``drift`` section of ``GET /v1/monitoring``)."""
        return self._report

    def _status(self, status: str, reason: str | None = None) -> dict[str, Any]:
        rule = self.options.rule
        return {"status": status, "reason": reason, "alert": False, "refreshed_at": None,
                "rule": {"psi_threshold": rule.psi_threshold, "min_records": rule.min_records,
                         "window": rule.window},
                "baseline": None if self.baseline is None else {"images": self.baseline.images,
                                                                "source": self.baseline.source},
                "window_records": 0, "signals": {}}

    def refresh(self) -> dict[str, Any]:
        """Measure drift now; set the gauges; returns (and keeps) the report. Never raises for a
        database that is down: the report says so and the gauges keep their last values."""
        if self.live_model is not None:
            self.model_version, self.baseline = self.live_model()
        if self.baseline is None:
            self._report = self._status("no-baseline", "the model has no validation baseline (btd baseline)")
        elif self.store is None:
            self._report = self._status("no-records", "prediction records are off (BTD_RECORDS=false)")
        else:
            try:
                if not self.store.migrated():  # a fresh database: the writer is creating it
                    self._report = self._status("no-records", "the records database is not created yet")
                    return self._report
                rows = self.store.recent(self.options.rule.window * self.options.history, RECORD_COLUMNS,
                                         self.model_version)
            except (SQLAlchemyError, OSError) as exc:  # the report says so; tried again next interval
                if not self._failing:
                    log.warning("drift: cannot read the records in %s (%s); tried again every %g s",
                                safe_url(self.store.url), type(exc).__name__, self.options.interval_s)
                self._failing = True
                self._report = {**self._report, "status": "unavailable",
                                "reason": "the records database cannot be read"}
                return self._report
            self._failing = False
            self._report = self._measured(drift_history(self.baseline, rows, self.options.rule,
                                                        self.options.history))
        metrics.DRIFT_REFRESHED.set(self.clock())
        return self._report

    def _measured(self, windows: list[DriftWindow]) -> dict[str, Any]:
        rule = self.options.rule
        report = self._status("ok")
        report["refreshed_at"] = datetime.fromtimestamp(self.clock(), timezone.utc).isoformat()
        current = windows[-1] if windows else None
        metrics.DRIFT_THRESHOLD.set(rule.psi_threshold)
        for gauge in (metrics.DRIFT_PSI, metrics.DRIFT_KS, metrics.DRIFT_OVER, metrics.DRIFT_WINDOW):
            gauge.clear()  # one model version at a time: a replaced model's series go
        metrics.DRIFT_WINDOW.labels(self.model_version).set(0 if current is None else current.records)
        if current is None:
            report.update(status="no-records", reason="no answers of this model version recorded yet")
            return report
        report.update(window_records=current.records, alert=current.alert,
                      status="alert" if current.alert else "ok")
        if current.records < rule.min_records:
            report["reason"] = f"{current.records} answers in the window; the rule needs {rule.min_records}"
        for name, drift in current.signals.items():
            report["signals"][name] = {
                **drift.to_dict(), "threshold": rule.psi_threshold, "window": rule.window,
                "history": [{"end": None if w.end is None else _iso(w.end), "records": w.records,
                             **{k: v for k, v in w.signals[name].to_dict().items() if k in ("psi", "ks")}}
                            for w in windows if name in w.signals]}
            if drift.psi is not None:
                metrics.DRIFT_PSI.labels(self.model_version, name).set(drift.psi)
            if drift.ks is not None:
                metrics.DRIFT_KS.labels(self.model_version, name).set(drift.ks)
            metrics.DRIFT_OVER.labels(self.model_version, name).set(int(drift.over))
        return report

    # -- the thread -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="btd-drift", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self.refresh()
            if self._stopping.wait(self.options.interval_s):
                return

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join(5.0)
        if self.store is not None:
            self.store.close()


def _iso(value: datetime) -> str:
    if value.tzinfo is None:  # SQLite gives naive datetimes back: they were written in UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()
