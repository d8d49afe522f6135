"""Alembic's environment for the prediction records (run by ``app.engine.records.store.migrate`` and
by the ``alembic`` command with ``-c`` pointing at a config naming this directory). The store passes
its open connection in ``config.attributes["connection"]``; otherwise the URL in the config is used.

Several replicas (or processes sharing a data directory) may start at once: on PostgreSQL each takes
a transaction-scoped advisory lock before migrating, on SQLite the database's write lock (BEGIN
IMMEDIATE), so one migrates and the others then find the schema at head."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from app.engine.records.schema import Base

MIGRATION_LOCK = 0x62746472  # "btdr": the advisory lock key the replicas' migrations share

config = context.config


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
    if connection.dialect.name == "sqlite":
        # A batch migration alters a table by copying it and dropping the old one: with foreign keys on,
        # dropping prediction_records would delete every reader's feedback (ON DELETE CASCADE). The
        # pragma is ignored inside a transaction, so it goes first; ``RecordStore.migrate`` then drops
        # the pooled connections, so none serves with foreign keys off.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # before alembic reads the version: it reads it under the lock
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif config.attributes.get("connection") is not None:
    run(config.attributes["connection"])
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as connection:
            run(connection)
    finally:
        engine.dispose()
