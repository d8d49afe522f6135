"""DICOM answers of ``POST /v1/predict``: which objects the client asked for (``format=dicom`` or the
Accept header) and the response carrying them. The objects come from ``app.transports.pacs``."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import Response

from app.core.decode import DICOM, sniff
from app.core.errors import NotAcceptable
from app.engine.service import Answer, InferenceService
from app.transports.pacs.multipart import encode_related, media_type_params
from app.transports.pacs.results import build_results, encode

ResultFormat = Literal["json", "dicom"]
DicomObjects = Literal["sr", "all"]  # the SR alone (Accept: application/dicom), or the SR and the overlay


def dicom_objects_wanted(result_format: str, accept: str | None) -> DicomObjects | None:
    """None for JSON; "all" for ``format=dicom`` or ``Accept: multipart/related; type="application/dicom"``;
    "sr" for ``Accept: application/dicom`` (one object fits a single-part answer)."""
    ranges = [media_type_params(entry) for entry in (accept or "").split(",") if entry.strip()]
    multipart = any(bare == "multipart/related" and params.get("type", "").lower() == DICOM for bare, params in ranges)
    single = any(bare == DICOM for bare, _ in ranges)
    if multipart or (result_format == "dicom" and not single):
        return "all"
    return "sr" if single else None


async def dicom_response(service: InferenceService, data: bytes, media_type: str | None,
                         objects: DicomObjects) -> tuple[Response, Answer]:
    """Classify a DICOM slice: (the response carrying its result objects, the answer they hold, for
    timings, the audit trail and the record); 406 for any other input. The file is parsed only where its pixels
    are decoded (the isolated worker, under its limits), which returns the attributes the results copy."""
    if sniff(data) != DICOM:
        raise NotAcceptable("DICOM results need a DICOM input: they copy its patient and study and reference it; "
                            "send a DICOM file, or ask for JSON")
    answer = await service.answer(data, media_type, "png" if objects == "all" else "none", source=True)
    datasets = await asyncio.to_thread(build_results, answer.source, answer.prediction)
    if objects == "sr":
        return Response(await asyncio.to_thread(encode, datasets[0]), media_type=DICOM), answer
    body, content_type = encode_related(await asyncio.to_thread(lambda: [encode(ds) for ds in datasets]))
    return Response(body, media_type=content_type), answer
