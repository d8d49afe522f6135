"""Fixtures shared by the unit tests: a records database, the same tests on SQLite and on the tests'
PostgreSQL server (tests/postgres.py), migrated to the newest schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.records.store import RecordStore
from tests.postgres import postgres  # noqa: F401  (the session's PostgreSQL server)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'btd.db'}"
    return request.getfixturevalue("postgres").database()


@pytest.fixture
def store(database_url: str):
    store = RecordStore(database_url)
    store.migrate()
    yield store
    store.close()
