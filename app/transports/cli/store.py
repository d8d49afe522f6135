"""``--store [URL]`` of the commands that classify in this process (``btd predict``, ``btd dicom-listen``,
``btd dicomweb``): their answers are recorded like the service's (README, "Prediction records"), in
URL or, without one, the service's database (``BTD_DATABASE_URL``, else SQLite in ``BTD_RECORDS_DIR``),
with its retention and bound. With ``--url`` the service records its own answers."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from app.engine.pipeline import InputFacts
from app.engine.records.options import RecordOptions
from app.engine.records.rows import Transport, prediction_row
from app.engine.records.writer import RecordWriter

STORE_HELP = ("record each answer (no patient data) in the prediction records database: URL, or without one "
              "BTD_DATABASE_URL / SQLite in BTD_RECORDS_DIR (README, \"Prediction records\"); not with --url, where "
              "the service records its own")


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", nargs="?", const="", default=None, metavar="URL", help=STORE_HELP)


def open_store(url: str | None) -> RecordWriter | None:
    """The started record writer for ``--store`` (``None``: not asked for; ``""``: the settings' database)."""
    if url is None:
        return None
    from app.settings import load_settings

    settings = load_settings()
    writer = RecordWriter(RecordOptions(url=url or settings.database(), queue_size=settings.records_queue_size,
                                        max_age_days=settings.records_retention_days,
                                        max_rows=settings.records_max_rows))
    writer.start()
    return writer


def record(writer: RecordWriter | None, transport: Transport, engine: Any, result: Any,
           facts: InputFacts | None) -> None:
    """One local answer's record (a new request id: a file name may carry patient data, so none is kept)."""
    if writer is not None:
        writer.add(prediction_row(request_id=str(uuid.uuid4()), transport=transport, model=engine.model_identity,
                                  answer=result, facts=facts))
