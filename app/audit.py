"""The audit trail: one JSON line per prediction (and per refused access to a protected route),
saying who asked what and what was answered, to stdout or a file (``BTD_AUDIT_LOG``).

A line holds time, request id, API key name (never the key), client address, route, model name,
version and sha256, label, tumour probability and decision, status and problem type, and timings.
Never patient data: no file names, no DICOM tags, no pixels, no warnings text. A file is opened in
append mode and reopened when log rotation moves it (``WatchedFileHandler``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from logging.handlers import WatchedFileHandler
from typing import Any

AUDIT_LOGGER = "btd.audit"


class AuditLog:
    def __init__(self, target: str) -> None:
        self.enabled = target.strip().lower() != "off"
        self.logger = logging.getLogger(AUDIT_LOGGER)
        self.logger.propagate = False  # its own stream, never mixed into the service log's format
        self.logger.setLevel(logging.INFO)
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
        if self.enabled:
            where = target.strip()
            handler = logging.StreamHandler(sys.stdout) if where.lower() == "stdout" else WatchedFileHandler(where)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.logger.info(json.dumps({"time": now, "event": event, **fields}, separators=(",", ":")))

    def prediction(self, *, request_id: str, key: str | None, client: str | None, route: str,
                   index: int | None, status: int, result: dict[str, Any] | None = None,
                   problem: str | None = None, model: dict[str, str] | None = None) -> None:
        """One prediction's line: ``result`` is the response dict (200), ``problem`` the problem type slug."""
        result = result or {}
        self.write(
            "prediction", request_id=request_id, key=key, client=client, route=route, index=index,
            status=status, problem=problem, model=result.get("model", model),
            label=result.get("label"), tumour_probability=result.get("tumour_probability"),
            tumour_detected=result.get("tumour_detected"), threshold=result.get("threshold"),
            timings_ms=result.get("timings_ms"),
        )

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
