"""Live performance as Prometheus gauges, refreshed by a thread every ``interval_s``
(``BTD_PERFORMANCE_INTERVAL_S``): a scrape reads the last report (``metrics.LIVE_PERFORMANCE``) and
never queries the database, and no request waits for it. A failed refresh (the database down or not
migrated yet) keeps the last figures, is logged once until one succeeds again, and is retried at the
next interval."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.engine import metrics
from app.engine.monitoring.performance import performance_report
from app.engine.records.store import RecordStore, safe_url

log = logging.getLogger("app.monitoring")


class PerformanceExporter:
    def __init__(self, store: RecordStore, interval_s: float,
                 report: Callable[[RecordStore], dict[str, Any]] = performance_report,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.ready = ready  # e.g. the record writer has migrated the database: no refresh (nor warning) before
        self.interval_s = interval_s
        self.report = report
        self.refreshed = 0  # successful refreshes since start
        self.last: dict[str, Any] | None = None  # the last report (GET /v1/monitoring serves it as it is)
        self._failing = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Compute the report now and publish it; False (logged once per outage) when it failed."""
        try:
            report = self.report(self.store)
        except (SQLAlchemyError, OSError) as exc:  # the database failed: the gauges keep their last figures
            if not self._failing:
                log.warning("live performance not refreshed from %s (%s); the gauges keep their last figures and "
                            "it is retried every %g s", safe_url(self.store.url), type(exc).__name__, self.interval_s)
            self._failing = True
            return False
        metrics.LIVE_PERFORMANCE.update(report, time.time())
        self.last = report
        if self._failing:
            log.info("live performance refreshed again")
        self._failing = False
        self.refreshed += 1
        return True

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="btd-performance", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            ready = self.ready()
            if ready:
                self.refresh()
            if self._stopping.wait(self.interval_s if ready else min(1.0, self.interval_s)):
                return

    def close(self, timeout_s: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            thread.join(timeout_s)
        self.store.close()
