"""The prediction records', readers' feedback and shadow comparisons' tables, declared once with SQLAlchemy 2: the Alembic migrations
(``migrations/versions``) create it, and a test checks that autogenerate finds no difference between
this declaration and the migrated database (no hand-written DDL drift).

One row per answered image. Never patient data: no DICOM attribute but Modality (and the MR
sequence and plane when a header said), no file name, no client address or API key, no pixels (a
hash of the model-size intensity image and a few intensity percentiles), no UID (a DICOM input's SOP
Instance UID only as its sha256, so that a reader's feedback on a PACS result can name its source).

One row of ``reader_feedback`` per prediction and reader: what a reader found on the image, joined to
its prediction (deleted with it when records are pruned). The reader is a pseudonymous id, never a name.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint and index names fixed by convention, so migrations on SQLite and PostgreSQL name them alike.
NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# SQLite only auto-increments an INTEGER PRIMARY KEY (its rowid); PostgreSQL gets a bigint identity.
RowId = BigInteger().with_variant(Integer(), "sqlite")


class PredictionRecord(Base):
    __tablename__ = "prediction_records"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True,
                                                  comment="when the answer was given (UTC)")
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    item: Mapped[int | None] = mapped_column(Integer, comment="the image's index in a batch or v2 request")
    transport: Mapped[str] = mapped_column(String(16), comment="http-v1, http-v2, cli, listener")
    route: Mapped[str | None] = mapped_column(String(128), comment="the HTTP route template")
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    pixels_sha256: Mapped[str | None] = mapped_column(String(64), comment="sha256 of the model-size float32 "
                                                      "intensity image (or of the tensor sent)")
    media_type: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    modality: Mapped[str | None] = mapped_column(String(16))
    sequence: Mapped[str | None] = mapped_column(String(32))
    plane: Mapped[str | None] = mapped_column(String(16))
    instance_sha256: Mapped[str | None] = mapped_column(String(64), index=True,
                                                        comment="sha256 of a DICOM input's SOP Instance UID")
    intensity_p01: Mapped[float | None] = mapped_column(Float)
    intensity_p05: Mapped[float | None] = mapped_column(Float)
    intensity_p50: Mapped[float | None] = mapped_column(Float)
    intensity_p95: Mapped[float | None] = mapped_column(Float)
    intensity_p99: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(64))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON, comment="calibrated, by label")
    tumour_probability: Mapped[float | None] = mapped_column(Float)
    tumour_detected: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    ood_score: Mapped[float | None] = mapped_column(Float)
    ood_threshold: Mapped[float | None] = mapped_column(Float)
    assessed: Mapped[bool] = mapped_column(Boolean)
    not_assessed_reasons: Mapped[str | None] = mapped_column(String(128), comment="comma list: modality, model, "
                                                             "no-head, small-image")
    decode_ms: Mapped[float | None] = mapped_column(Float)
    preprocess_ms: Mapped[float | None] = mapped_column(Float)
    queue_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    cam_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)


class ReaderFeedback(Base):
    __tablename__ = "reader_feedback"
    # One reading per prediction and reader: sent again it is the same row, a correction replaces it.
    __table_args__ = (UniqueConstraint("prediction_id", "reader_id"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    # The unique constraint's index (prediction_id first) serves the lookups and the cascade.
    prediction_id: Mapped[int] = mapped_column(RowId, ForeignKey(PredictionRecord.id, ondelete="CASCADE"))
    reader_id: Mapped[str] = mapped_column(String(64), comment="pseudonymous reader id; empty when none was given")
    label: Mapped[str | None] = mapped_column(String(64), comment="the class the reader found (a model label)")
    tumour_present: Mapped[bool | None] = mapped_column(Boolean, comment="whether the reader found a tumour")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                 comment="the last correction (created_at when none)")


RECORDS = PredictionRecord.__table__
FEEDBACK = ReaderFeedback.__table__


class ShadowComparison(Base):
    """One image a shadow model (``BTD_SHADOW_MODEL``) also answered: its answer beside the live one's
    (the prediction record of the same ``request_id`` and ``item``). No patient data, as above."""

    __tablename__ = "shadow_comparisons"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    item: Mapped[int | None] = mapped_column(Integer, comment="the image's index in a batch request")
    live_model_version: Mapped[str] = mapped_column(String(64))
    live_model_sha256: Mapped[str] = mapped_column(String(64))
    shadow_model_name: Mapped[str] = mapped_column(String(128))
    shadow_model_version: Mapped[str] = mapped_column(String(64), index=True)
    shadow_model_sha256: Mapped[str] = mapped_column(String(64))
    shadow_label: Mapped[str] = mapped_column(String(64))
    shadow_tumour_probability: Mapped[float | None] = mapped_column(Float)
    shadow_tumour_detected: Mapped[bool | None] = mapped_column(Boolean)
    shadow_assessed: Mapped[bool] = mapped_column(Boolean)
    label_agrees: Mapped[bool] = mapped_column(Boolean, comment="the same label as the live answer")
    tumour_agrees: Mapped[bool] = mapped_column(Boolean, comment="the same tumour decision as the live answer")
    shadow_inference_ms: Mapped[float | None] = mapped_column(Float)


SHADOW_COMPARISONS = ShadowComparison.__table__
