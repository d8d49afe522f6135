"""The background writer: answers are recorded off the request path, in batches, and a slow or
absent database never costs an answer.

``add`` is called where an answer is made (the event loop): it puts the row on a bounded queue and
returns (a full queue drops the row). One thread takes rows in batches (up to ``batch_size``, waiting
at most ``linger_s`` for company) and inserts each batch in one transaction. A batch the database
refuses, or a row the full queue drops, is lost: counted in ``btd_records_lost_total`` (by reason)
and logged once per outage, with one more line when records are written again saying how many were
lost. After a failure the writer waits before trying again (up to ``MAX_RETRY_S``); rows meanwhile
wait on the queue, so a short outage loses nothing while the queue holds.

The thread migrates the database first (``RecordStore.migrate``) and retries that too, so a service
whose database is down at start still serves. Old records are pruned by age and count at start and
every ``prune_interval_s``. ``close`` flushes what waits (bounded by a timeout: what is left is lost).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Table

from app.engine import metrics
from app.engine.records.options import RecordOptions
from app.engine.records.schema import RECORDS
from app.engine.records.store import RecordStore, safe_url

log = logging.getLogger("app.records")

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
_STOP = object()


class RecordWriter:
    def __init__(self, options: RecordOptions, store: RecordStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.store = store or RecordStore(options.url, busy_timeout_s=options.busy_timeout_s)
        self.queue: queue.Queue[Any] = queue.Queue(options.queue_size)
        self.clock = clock
        self.migrated = False
        self.written = 0  # rows written since start
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._in_outage = False  # a line said records are failing; one more says when they are written again
        self._outage_lost = 0
        self._thread: threading.Thread | None = None
        self._next_prune = 0.0

    # -- the request side (event loop): never blocks ----------------------------------------------

    def add(self, row: dict[str, Any], table: Table = RECORDS) -> None:
        """Queue one row of ``table`` (a prediction record unless said otherwise)."""
        try:
            self.queue.put_nowait((table, row))
        except queue.Full:
            self._lost("queue-full", 1, "the record queue is full: the database is slow or down")

    def wait_written(self, timeout_s: float) -> bool:
        """Wait until every row added so far is written (or lost); False when ``timeout_s`` passed first.
        Blocking: readers' feedback on an answer given a moment ago waits here for its record."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            metrics.RECORDS_WAITING.set_function(self.queue.qsize)
            self._thread = threading.Thread(target=self._run, name="btd-records", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what waits (for at most ``timeout_s``), then stop; rows left are counted lost."""
        thread, self._thread = self._thread, None
        if thread is not None:
            deadline = time.monotonic() + timeout_s
            self._stopping.set()
            while thread.is_alive():  # the stop mark goes behind the rows waiting
                try:
                    self.queue.put(_STOP, timeout=0.05)
                    break
                except queue.Full:
                    if time.monotonic() > deadline:
                        break
            thread.join(max(0.0, deadline - time.monotonic()))
        left = 0
        while True:
            try:
                left += self.queue.get_nowait() is not _STOP
            except queue.Empty:
                break
            self.queue.task_done()
        if left:
            self._lost("shutdown", left, "records still waiting at shutdown could not be written in time")
        self.store.close()

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        retry_s = FIRST_RETRY_S
        while True:
            if not self._ensure_ready():
                if self._stopping.wait(retry_s):
                    return  # the database is down at shutdown: close counts what waits
                retry_s = min(MAX_RETRY_S, retry_s * 2)
                continue
            batch, stop = self._take_batch()
            written = self._write(batch) if batch else True
            for _ in batch:  # written or lost: no longer waiting (``wait_written``)
                self.queue.task_done()
            if batch and not written:
                if stop or self._stopping.wait(retry_s):
                    return
                retry_s = min(MAX_RETRY_S, retry_s * 2)
            elif batch:
                retry_s = FIRST_RETRY_S
            if stop:
                return
            self._prune_when_due()

    def _ensure_ready(self) -> bool:
        if self.migrated:
            return True
        try:
            self.store.migrate()
        except Exception as exc:  # any database failure: the service keeps answering
            self._trouble(f"cannot migrate the records database {safe_url(self.store.url)}", exc)
            return False
        self.migrated = True
        log.info("prediction records: %s at the newest schema", safe_url(self.store.url))
        self._prune_when_due()
        return True

    def _take_batch(self) -> tuple[list[tuple[Table, dict[str, Any]]], bool]:
        """Up to ``batch_size`` rows: the first waited for (until the next prune is due), the others
        for at most ``linger_s``; and True when the stop mark came."""
        options = self.options
        try:
            first = self.queue.get(timeout=min(options.prune_interval_s, max(0.05, self._next_prune - self.clock())))
        except queue.Empty:
            return [], False
        if first is _STOP:
            self.queue.task_done()
            return [], True
        batch = [first]
        deadline = time.monotonic() + options.linger_s
        while len(batch) < options.batch_size:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                self.queue.task_done()
                return batch, True
            batch.append(item)
        return batch, False

    def _write(self, batch: list[tuple[Table, dict[str, Any]]]) -> bool:
        by_table: dict[Table, list[dict[str, Any]]] = {}
        for table, row in batch:
            by_table.setdefault(table, []).append(row)
        try:
            self.store.insert_tables(by_table)
        except Exception as exc:  # any database failure: the rows are lost, the service keeps answering
            self._trouble("the records database refused a batch", exc)
            self._lost("database", len(batch))
            return False
        predictions = len(by_table.get(RECORDS, ()))  # the counter is of prediction records
        self.written += predictions
        metrics.RECORDS_WRITTEN.inc(predictions)
        self._recovered()
        return True

    def _prune_when_due(self) -> None:
        options = self.options
        if self.clock() < self._next_prune:
            return
        self._next_prune = self.clock() + options.prune_interval_s
        if not (options.max_age_days or options.max_rows):
            return
        try:
            deleted = self.store.prune(max_age_days=options.max_age_days, max_rows=options.max_rows)
        except Exception as exc:  # tried again at the next interval
            log.warning("prediction records: pruning failed (%s: %s); tried again in %g s", type(exc).__name__,
                        first_line(exc), options.prune_interval_s)
            return
        if deleted:
            log.info("prediction records: %d deleted (older than %g days or beyond %d rows)", deleted,
                     options.max_age_days, options.max_rows)

    # -- losses: one line when an outage begins, one when records are written again ----------------

    def _trouble(self, what: str, exc: Exception | None = None) -> None:
        with self._lock:
            first, self._in_outage = not self._in_outage, True
        if first:
            cause = f" ({type(exc).__name__}: {first_line(exc)})" if exc is not None else ""
            log.error("prediction records: %s%s. Answers are still given; records wait on the queue (%d) and "
                      "those dropped are counted in btd_records_lost_total. One line follows when records are "
                      "written again", what, cause, self.options.queue_size)

    def _lost(self, reason: str, count: int, why: str | None = None) -> None:
        metrics.RECORDS_LOST.labels(reason).inc(count)
        with self._lock:
            self._outage_lost += count
        if why is not None:
            self._trouble(why)

    def _recovered(self) -> None:
        if self.queue.qsize() > self.options.queue_size // 2:
            return  # written, but not keeping up yet: the outage goes on (no line per batch)
        with self._lock:
            was, lost = self._in_outage, self._outage_lost
            self._in_outage, self._outage_lost = False, 0
        if was:
            log.warning("prediction records are written again; %d were lost meanwhile", lost)


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
