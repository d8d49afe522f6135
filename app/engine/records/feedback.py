"""Readers' feedback on recorded predictions (README, "Readers' feedback"): what a reader found on an
image, joined to the prediction record of the answer they saw. Blocking database calls: the HTTP route
runs them in a thread, never on the event loop.

Which prediction: its ``request_id`` (with ``item`` for one image of a batch or Open Inference
Protocol request), or a PACS result's source SOP Instance UID, looked up by its sha256 (the record
keeps no UID); an instance classified more than once gets the feedback on its newest record.

The rule, one reading per (prediction, reader): the same finding sent again is the stored row,
untouched (``unchanged``); another finding from the same reader replaces it (``replaced``: the
reader corrected themself; ``created_at`` stays, ``updated_at`` moves); else a new row (``created``).
Feedback without ``reader_id`` is the anonymous reader's: one such reading per prediction.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from app.core.contract import NO_TUMOUR_LABEL
from app.core.errors import InvalidRequest, PredictionNotFound, RecordsUnavailable
from app.engine.records.schema import FEEDBACK, RECORDS
from app.engine.records.store import RecordStore
from app.engine.records.writer import RecordWriter

# A pseudonym, never a name: letters, digits, '-' and '_' (no spaces, dots, '@' or '^': no
# "Doe^Jane", "jane.doe" or e-mail address). The service cannot tell a pseudonym from a name
# written without them: the reading system must send one (README).
READER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ANONYMOUS = ""  # reader_id stored for feedback that names no reader
Outcome = Literal["created", "unchanged", "replaced"]
# Records are written in batches off the request path (``writer``): feedback on an answer given a moment
# ago waits at most this long for its record before it is "not found".
PENDING_WAIT_S = 2.0


@dataclass(frozen=True)
class Finding:
    """What the reader found: a class (one of the model's labels) and/or whether there is a tumour."""

    label: str | None = None
    tumour_present: bool | None = None


@dataclass(frozen=True)
class SavedFeedback:
    feedback_id: int
    outcome: Outcome
    request_id: str
    item: int | None
    model_name: str
    model_version: str
    predicted_label: str
    predicted_tumour: bool | None
    reader_id: str | None
    finding: Finding
    created_at: datetime
    updated_at: datetime


def resolve_finding(finding: Finding, labels: Collection[str]) -> Finding:
    """The finding checked against the prediction's model labels, ``tumour_present`` filled in from
    the label when the model has a no-tumour class. Raises ``InvalidRequest`` (422) for a label the
    model does not have, for a label and ``tumour_present`` that disagree, or for neither."""
    label, present = finding.label, finding.tumour_present
    if label is None and present is None:
        raise InvalidRequest("give the reader's finding: label (one of the model's labels) and/or tumour_present")
    if label is not None and label not in labels:
        raise InvalidRequest(f"label {label!r} is not one of the model's labels: {', '.join(labels)}")
    if label is not None and NO_TUMOUR_LABEL in labels:
        implied = label != NO_TUMOUR_LABEL
        if present is not None and present != implied:
            raise InvalidRequest(f"label {label!r} and tumour_present={str(present).lower()} disagree")
        present = implied
    return Finding(label, present)


def _prediction(connection: Connection, request_id: str | None, item: int | None,
                instance_sha256: str | None) -> dict[str, Any]:
    columns = (RECORDS.c.id, RECORDS.c.request_id, RECORDS.c.item, RECORDS.c.model_name, RECORDS.c.model_version,
               RECORDS.c.label, RECORDS.c.tumour_detected, RECORDS.c.probabilities)
    if instance_sha256 is not None:
        query = select(*columns).where(RECORDS.c.instance_sha256 == instance_sha256).order_by(RECORDS.c.id.desc())
        found = connection.execute(query.limit(1)).mappings().first()
        if found is None:
            raise PredictionNotFound("no recorded prediction of that SOP Instance UID (not classified here with "
                                     "BTD_RECORDS on, or pruned since)")
        return dict(found)
    query = select(*columns).where(RECORDS.c.request_id == request_id)
    if item is not None:
        query = query.where(RECORDS.c.item == item)
    found = [dict(r) for r in connection.execute(query.order_by(RECORDS.c.id).limit(2)).mappings()]
    if not found:
        raise PredictionNotFound("no recorded prediction has that request_id" +
                                 (f" and item {item}" if item is not None else "") +
                                 " (not answered here with BTD_RECORDS on, or pruned since)")
    if len(found) > 1:
        raise InvalidRequest("that request answered several images: say which with item (its index in the request)")
    return found[0]


def save_feedback(store: RecordStore, finding: Finding, *, request_id: str | None = None, item: int | None = None,
                  instance_sha256: str | None = None, reader_id: str | None = None,
                  now: datetime | None = None) -> SavedFeedback:
    """Store a reader's finding on one recorded prediction (the module's rule). Raises
    ``PredictionNotFound``, or ``InvalidRequest`` for a finding the prediction's model cannot have."""
    if (request_id is None) == (instance_sha256 is None):
        raise InvalidRequest("name the prediction by request_id or by sop_instance_uid (one of them)")
    reader = reader_id or ANONYMOUS
    for attempt in range(2):  # a concurrent first reading by the same reader wins the insert: read it then
        try:
            with store.engine.begin() as connection:
                return _save(connection, finding, request_id, item, instance_sha256, reader,
                             now or datetime.now(timezone.utc))
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def record_feedback(writer: RecordWriter, finding: Finding, wait_s: float = PENDING_WAIT_S,
                    **where: Any) -> SavedFeedback:
    """``save_feedback`` in the record writer's database (``where``: its keyword arguments). A prediction
    not found while records still wait to be written is looked for again once they are (``wait_s`` at
    most). Raises ``RecordsUnavailable`` (503) while the database is down or not migrated yet."""
    if not writer.migrated:
        raise RecordsUnavailable("the records database is not ready yet (migrating, or unreachable); try again "
                                 "in a moment", headers={"Retry-After": "5"})
    try:
        try:
            return save_feedback(writer.store, finding, **where)
        except PredictionNotFound:
            if not writer.queue.unfinished_tasks or not writer.wait_written(wait_s):
                raise
            return save_feedback(writer.store, finding, **where)
    except SQLAlchemyError as exc:
        raise RecordsUnavailable(f"the records database did not take the feedback ({type(exc).__name__}); try "
                                 "again in a moment", headers={"Retry-After": "5"}) from None


def _save(connection: Connection, finding: Finding, request_id: str | None, item: int | None,
          instance_sha256: str | None, reader: str, now: datetime) -> SavedFeedback:
    prediction = _prediction(connection, request_id, item, instance_sha256)
    finding = resolve_finding(finding, list(prediction["probabilities"]))
    key = (FEEDBACK.c.prediction_id == prediction["id"]) & (FEEDBACK.c.reader_id == reader)
    stored = connection.execute(select(FEEDBACK).where(key)).mappings().first()
    values = {"label": finding.label, "tumour_present": finding.tumour_present}
    if stored is None:
        feedback_id = connection.execute(insert(FEEDBACK).values(
            prediction_id=prediction["id"], reader_id=reader, created_at=now, updated_at=now, **values)
        ).inserted_primary_key[0]
        outcome: Outcome = "created"
        created, updated = now, now
    else:
        feedback_id, created, updated = stored["id"], stored["created_at"], stored["updated_at"]
        outcome = "unchanged"
        if (stored["label"], stored["tumour_present"]) != (finding.label, finding.tumour_present):
            connection.execute(update(FEEDBACK).where(FEEDBACK.c.id == feedback_id).values(updated_at=now, **values))
            outcome, updated = "replaced", now
    return SavedFeedback(
        feedback_id=int(feedback_id), outcome=outcome, request_id=prediction["request_id"], item=prediction["item"],
        model_name=prediction["model_name"], model_version=prediction["model_version"],
        predicted_label=prediction["label"], predicted_tumour=prediction["tumour_detected"],
        reader_id=reader or None, finding=finding, created_at=_utc(created), updated_at=_utc(updated))


def _utc(when: datetime) -> datetime:
    """SQLite gives naive datetimes back (stored as UTC)."""
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def confirmed_rows(store: RecordStore) -> list[dict[str, Any]]:
    """Every reading joined to its prediction, the columns live performance needs (no patient data):
    ``prediction_id``, ``model_version``, the model's ``label``, ``tumour_probability``,
    ``tumour_detected``, ``assessed``, and the reader's ``reader_label``, ``reader_tumour``."""
    query = (select(RECORDS.c.id.label("prediction_id"), RECORDS.c.model_version, RECORDS.c.label,
                    RECORDS.c.tumour_probability, RECORDS.c.tumour_detected, RECORDS.c.assessed,
                    FEEDBACK.c.label.label("reader_label"), FEEDBACK.c.tumour_present.label("reader_tumour"))
             .join(RECORDS, RECORDS.c.id == FEEDBACK.c.prediction_id).order_by(FEEDBACK.c.id))
    with store.engine.connect() as connection:
        return [dict(r) for r in connection.execute(query).mappings()]
