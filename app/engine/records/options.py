"""The record writer's options, plain (no database import): ``Settings.record_options`` makes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


@dataclass(frozen=True)
class RecordOptions:
    url: str  # SQLAlchemy URL of the database (it may hold a password: never logged as is)
    queue_size: int = 10_000  # rows waiting for the database; beyond, new rows are lost (counted)
    batch_size: int = 256  # rows per insert
    linger_s: float = 0.2  # the longest a row waits for others to fill its batch
    max_age_days: float = 0  # records older are deleted; 0: kept
    max_rows: int = 0  # beyond, the oldest are deleted; 0: no bound
    prune_interval_s: float = 600.0  # how often the bounds are applied (and once at start)
    busy_timeout_s: float = 5.0  # SQLite: wait for another writer's lock this long
