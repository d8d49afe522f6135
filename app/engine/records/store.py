"""The database behind the prediction records: SQLite (WAL) in a data directory by default, or
PostgreSQL (``postgresql+psycopg://...``) for several replicas. Blocking calls: the writer thread
(``app.engine.records.writer``) makes them, never the event loop.

The schema is Alembic's (``migrations/``, shipped in the package): ``migrate`` upgrades the database
to head, so a service starting on an empty data directory creates it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, delete, event, func, insert, inspect, select
from sqlalchemy.engine import URL, make_url

from app.engine.records.schema import FEEDBACK, RECORDS, SHADOW_COMPARISONS

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 5.0  # a writer waits this long for another's lock before the batch counts as lost
CONNECT_TIMEOUT_S = 5  # PostgreSQL: a database that does not answer costs a batch at most this (and the statement)
STATEMENT_TIMEOUT_MS = 10_000


def alembic_config(url: URL | str | None = None):
    """Alembic's configuration for the shipped migrations (no ini file needed)."""
    from alembic.config import Config  # imported when migrating: the CLI's start does not pay for it

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if url is not None:
        rendered = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def safe_url(url: str | URL) -> str:
    """The URL with its password hidden, for logs."""
    return make_url(url).render_as_string(hide_password=True)


class RecordStore:
    """One database's records: migrate, insert a batch, prune by age and count (readers' feedback on a
    pruned record goes with it). Readers' feedback: ``app.engine.records.feedback``."""

    def __init__(self, url: str, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
                 connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        self.url = make_url(url)
        self.engine: Engine = self._create_engine(busy_timeout_s, connect_timeout_s)

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def _create_engine(self, busy_timeout_s: float, connect_timeout_s: int) -> Engine:
        if self.is_sqlite:
            engine = create_engine(self.url, connect_args={"timeout": busy_timeout_s})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and the reverse
                cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; safe with WAL
                cursor.execute("PRAGMA foreign_keys=ON")  # pruning a record deletes its feedback (ON DELETE CASCADE)
                cursor.close()

            return engine
        connect_args: dict[str, Any] = {}
        if self.url.get_backend_name() == "postgresql":
            connect_args = {"connect_timeout": connect_timeout_s,
                            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"}
        return create_engine(self.url, pool_pre_ping=True, pool_size=2, max_overflow=0, connect_args=connect_args)

    def migrate(self) -> None:
        """Upgrade the schema to the newest migration (an empty database: create it). For SQLite the
        data directory is created first."""
        if self.is_sqlite and self.url.database not in (None, "", ":memory:"):
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at import
        from alembic import command

        config = alembic_config(self.url)
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        if self.is_sqlite:
            self.engine.dispose()  # the migrating connection had foreign keys off (env.py): not pooled again

    def insert(self, rows: list[dict[str, Any]], table: Table = RECORDS) -> None:
        """One transaction for the batch (executemany)."""
        self.insert_tables({table: rows})

    def insert_tables(self, rows: dict[Table, list[dict[str, Any]]]) -> None:
        """One transaction for the rows of several tables (executemany each)."""
        with self.engine.begin() as connection:
            for table, table_rows in rows.items():
                if table_rows:
                    connection.execute(insert(table), table_rows)

    def prune(self, *, max_age_days: float = 0, max_rows: int = 0, now: datetime | None = None) -> int:
        """Delete records older than ``max_age_days`` and, beyond ``max_rows``, the oldest; 0: no
        such bound. Returns how many rows went."""
        deleted = 0
        with self.engine.begin() as connection:
            if max_age_days > 0:
                cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=max_age_days)
                deleted += connection.execute(delete(RECORDS).where(RECORDS.c.recorded_at < cutoff)).rowcount or 0
                connection.execute(delete(SHADOW_COMPARISONS).where(SHADOW_COMPARISONS.c.recorded_at < cutoff))
            if max_rows > 0:
                # The id of the newest row beyond the bound: it and every older row go.
                newest_gone = (select(RECORDS.c.id).order_by(RECORDS.c.id.desc()).offset(max_rows).limit(1)
                               .scalar_subquery())
                deleted += connection.execute(delete(RECORDS).where(RECORDS.c.id <= newest_gone)).rowcount or 0
        return deleted

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(RECORDS)).scalar_one())

    def rows(self, table: Table = RECORDS) -> list[dict[str, Any]]:
        """Every record (of ``table``), oldest first, as plain dicts."""
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(select(table).order_by(table.c.id)).mappings()]

    def feedback(self) -> list[dict[str, Any]]:
        """Every reader's feedback, oldest first, as plain dicts."""
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(select(FEEDBACK).order_by(FEEDBACK.c.id)).mappings()]

    def migrated(self) -> bool:
        """Whether the records table exists (the writer migrates at start, in its own thread)."""
        return inspect(self.engine).has_table(RECORDS.name)

    def recent(self, limit: int, columns: Sequence[str], model_version: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` records (of ``model_version`` when given), oldest first, holding ``columns``."""
        query = select(*(RECORDS.c[name] for name in columns)).order_by(RECORDS.c.id.desc()).limit(limit)
        if model_version is not None:
            query = query.where(RECORDS.c.model_version == model_version)
        with self.engine.connect() as connection:
            return [dict(r) for r in connection.execute(query).mappings()][::-1]

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
