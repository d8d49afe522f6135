"""The audit trail: one JSON line per prediction (and per refused access to a protected route, and
per reader's feedback stored or changed), saying who asked what and what was answered, to stdout or a
file (``BTD_AUDIT_LOG``).

A line holds time, request id, API key name (never the key), client address, route template
(``/v2/models/{model_name}/infer``, never the raw path: a client chooses it), model name, version
and sha256, label, tumour probability and decision, status and problem type, and timings. Never
patient data: no file names, no DICOM tags, no pixels, no warnings text. A file is opened in
append mode and reopened when log rotation moves it (``WatchedFileHandler``); the handler is the
app's own, not a shared logger, so it never mixes with the service log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from logging.handlers import WatchedFileHandler
from typing import Any


class AuditLog:
    def __init__(self, target: str) -> None:
        where = target.strip()
        self.handler: logging.Handler | None = None
        if where.lower() == "stdout":
            self.handler = logging.StreamHandler(sys.stdout)
        elif where.lower() != "off":
            self.handler = WatchedFileHandler(where)
        if self.handler is not None:
            self.handler.setFormatter(logging.Formatter("%(message)s"))

    @property
    def enabled(self) -> bool:
        return self.handler is not None

    def write(self, event: str, **fields: Any) -> None:
        if self.handler is None:
            return
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = json.dumps({"time": now, "event": event, **fields}, separators=(",", ":"))
        self.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO",
                                                   "name": "btd.audit"}))

    def prediction(self, *, request_id: str, key: str | None, client: str | None, route: str,
                   index: int | None, status: int, model: dict[str, str], problem: str | None = None,
                   label: str | None = None, tumour_probability: float | None = None,
                   tumour_detected: bool | None = None, threshold: float | None = None,
                   in_distribution: bool | None = None, timings_ms: dict[str, float] | None = None) -> None:
        """One prediction's line: the answer's fields (status 200) or the problem type slug."""
        self.write("prediction", request_id=request_id, key=key, client=client, route=route, index=index,
                   status=status, problem=problem, model=model, label=label, tumour_probability=tumour_probability,
                   tumour_detected=tumour_detected, threshold=threshold, in_distribution=in_distribution,
                   timings_ms=timings_ms)

    def close(self) -> None:
        if self.handler is not None:
            self.handler.close()
            self.handler = None
