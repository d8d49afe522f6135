"""Readers' feedback in the records database (app/engine/records/feedback.py), on SQLite and on the
tests' PostgreSQL server (``database_url``, ``store``: tests/unit/conftest.py): one reading per prediction and reader, the
finding checked against the prediction's model, pruning taking the feedback with its record."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command

from app.core.decode import instance_uid_sha256
from app.core.errors import InvalidRequest, PredictionNotFound, RecordsUnavailable
from app.engine.records.feedback import (
    Finding,
    confirmed_rows,
    record_feedback,
    resolve_finding,
    save_feedback,
)
from app.engine.records.options import RecordOptions
from app.engine.records.store import MIGRATIONS, RecordStore, alembic_config
from app.engine.records.writer import RecordWriter
from tests.unit.test_records import LABELS, row, wait_for

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def test_a_finding_is_checked_against_the_predictions_labels():
    assert resolve_finding(Finding("glioma"), LABELS) == Finding("glioma", True)
    assert resolve_finding(Finding("notumor"), LABELS) == Finding("notumor", False)
    assert resolve_finding(Finding(None, True), LABELS) == Finding(None, True)
    assert resolve_finding(Finding("notumor", False), LABELS) == Finding("notumor", False)
    for bad in (Finding(), Finding("banana"), Finding("notumor", True), Finding("pituitary", False)):
        with pytest.raises(InvalidRequest):
            resolve_finding(bad, LABELS)
    # A model without a no-tumour class: the label says nothing of tumour_present.
    assert resolve_finding(Finding("a", False), ("a", "b")) == Finding("a", False)


def test_the_same_reading_is_unchanged_and_a_correction_replaces_it(store: RecordStore):
    store.insert([row("req-1"), row("req-2")])
    first = save_feedback(store, Finding("glioma"), request_id="req-1", reader_id="r1", now=T0)
    again = save_feedback(store, Finding("glioma", True), request_id="req-1", reader_id="r1", now=T0 + timedelta(1))
    fixed = save_feedback(store, Finding("notumor"), request_id="req-1", reader_id="r1", now=T0 + timedelta(2))
    other = save_feedback(store, Finding(None, False), request_id="req-1", reader_id="r2", now=T0)
    anonymous = save_feedback(store, Finding("meningioma"), request_id="req-2", now=T0)
    assert (first.outcome, again.outcome, fixed.outcome, other.outcome) == ("created", "unchanged", "replaced", "created")
    assert first.feedback_id == again.feedback_id == fixed.feedback_id != other.feedback_id
    assert again.updated_at == T0 and fixed.created_at == T0 and fixed.updated_at == T0 + timedelta(2)
    assert first.predicted_label == "glioma" and first.model_version == "0.0.1" and anonymous.reader_id is None
    rows = store.feedback()
    assert [(r["reader_id"], r["label"], r["tumour_present"]) for r in rows] == [
        ("r1", "notumor", False), ("r2", None, False), ("", "meningioma", True)]
    records = {r["request_id"]: r["id"] for r in store.rows()}
    assert [r["prediction_id"] for r in rows] == [records["req-1"], records["req-1"], records["req-2"]]


def test_concurrent_first_readings_by_one_reader_make_one_row(store: RecordStore):
    store.insert([row("req-race")])
    start = threading.Barrier(4)

    def send(_: int) -> str:
        start.wait()
        return save_feedback(store, Finding("glioma"), request_id="req-race", reader_id="r1").outcome

    with ThreadPoolExecutor(4) as pool:
        outcomes = sorted(pool.map(send, range(4)))
    assert outcomes == ["created", "unchanged", "unchanged", "unchanged"]
    assert len(store.feedback()) == 1


def test_a_prediction_is_found_by_request_item_or_instance(store: RecordStore):
    batch = [row("req-batch"), row("req-batch")]
    batch[1]["item"] = 1
    dicom, resent = row("req-dicom"), row("req-resent")
    dicom["instance_sha256"] = resent["instance_sha256"] = instance_uid_sha256("1.2.826.0.1.3680043.2.1125.1")
    store.insert([*batch, dicom, resent])
    with pytest.raises(InvalidRequest, match="several images"):
        save_feedback(store, Finding("glioma"), request_id="req-batch")
    assert save_feedback(store, Finding("glioma"), request_id="req-batch", item=1).item == 1
    for missing in ({"request_id": "nope"}, {"request_id": "req-batch", "item": 5},
                    {"instance_sha256": instance_uid_sha256("1.2.3")}):
        with pytest.raises(PredictionNotFound):
            save_feedback(store, Finding("glioma"), **missing)
    # An instance classified twice: the feedback joins its newest record.
    by_uid = save_feedback(store, Finding("glioma"), instance_sha256=instance_uid_sha256(" 1.2.826.0.1.3680043.2.1125.1"))
    assert by_uid.request_id == "req-resent"


def test_pruning_a_record_deletes_its_feedback(store: RecordStore):
    now = datetime.now(timezone.utc)
    store.insert([row("old", when=now - timedelta(days=30)), row("new", when=now)])
    save_feedback(store, Finding("glioma"), request_id="old", reader_id="r1")
    save_feedback(store, Finding("glioma"), request_id="new", reader_id="r1")
    assert store.prune(max_age_days=7, now=now) == 1
    assert [r["prediction_id"] for r in store.feedback()] == [store.rows()[0]["id"]]


def test_confirmed_rows_join_readings_to_their_predictions(store: RecordStore):
    store.insert([row("a"), row("b"), row("unread")])
    save_feedback(store, Finding("notumor"), request_id="a", reader_id="r1")
    save_feedback(store, Finding(None, True), request_id="a", reader_id="r2")
    save_feedback(store, Finding("glioma"), request_id="b")
    rows = confirmed_rows(store)
    assert [(r["label"], r["reader_label"], r["reader_tumour"]) for r in rows] == [
        ("glioma", "notumor", False), ("glioma", None, True), ("glioma", "glioma", True)]
    assert rows[0]["prediction_id"] == rows[1]["prediction_id"] != rows[2]["prediction_id"]
    assert {r["model_version"] for r in rows} == {"0.0.1"} and all(r["assessed"] for r in rows)


def test_feedback_on_an_answer_just_given_waits_for_its_record(database_url: str):
    writer = RecordWriter(RecordOptions(url=database_url, linger_s=0.5))
    writer.start()
    try:
        wait_for(lambda: writer.migrated)
        writer.add(row("just-now"))  # still in the writer's hands when the feedback comes
        saved = record_feedback(writer, Finding("glioma"), request_id="just-now")
        assert saved.outcome == "created"
        with pytest.raises(PredictionNotFound):
            record_feedback(writer, Finding("glioma"), request_id="never")
    finally:
        writer.close()


def test_feedback_before_the_database_is_migrated_is_unavailable(tmp_path: Path):
    writer = RecordWriter(RecordOptions(url=f"sqlite:///{tmp_path / 'btd.db'}"))  # not started: not migrated
    with pytest.raises(RecordsUnavailable):
        record_feedback(writer, Finding("glioma"), request_id="r")
    writer.store.close()


def test_a_sqlite_migration_that_copies_the_records_table_keeps_the_feedback(tmp_path: Path):
    # SQLite alters a table by copying it (Alembic's batch mode): with foreign keys on, dropping the old
    # prediction_records would cascade to every reader's feedback. A later migration doing so keeps it.
    # (PostgreSQL alters tables in place.)
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_copy_records.py").write_text(
        "from alembic import op\nimport sqlalchemy as sa\n"
        "revision = '9999'\ndown_revision = '0003'\nbranch_labels = None\ndepends_on = None\n\n\n"
        "def upgrade():\n"
        "    with op.batch_alter_table('prediction_records', recreate='always') as batch:\n"
        "        batch.add_column(sa.Column('scratch', sa.Integer(), nullable=True))\n")
    store = RecordStore(f"sqlite:///{tmp_path / 'btd.db'}")
    try:
        store.migrate()
        store.insert([row("kept")])
        save_feedback(store, Finding("glioma"), request_id="kept", reader_id="r1")
        config = alembic_config(store.url)
        config.set_main_option("script_location", str(scripts))
        with store.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        store.engine.dispose()
        assert [f["reader_id"] for f in store.feedback()] == ["r1"]
        store.prune(max_rows=1)
        store.insert([row("newer")])
        store.prune(max_rows=1)  # the pool's connections have foreign keys on again: the cascade works
        assert store.feedback() == []
    finally:
        store.close()
