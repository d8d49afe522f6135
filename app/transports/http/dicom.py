"""DICOM answers of ``POST /v1/predict`` and ``POST /v1/predict/series``: which objects the client asked
for (``format=dicom`` or the Accept header) and the response carrying them. The objects come from
``app.transports.pacs`` (a series' are those the series-mode listener stores: SR, KOS, key overlays,
Segmentation)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import Response

from app.core.decode import DICOM, sniff
from app.core.errors import NotAcceptable
from app.engine.series import DicomSeriesAnswer, SeriesLimits, answer_dicom_series
from app.engine.service import Answer, InferenceService
from app.transports.pacs.multipart import encode_related, media_type_params
from app.transports.pacs.results import build_results, encode
from app.transports.pacs.series_results import ClassifiedSeries, ClassifiedSlice, build_series_results

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
    return await _objects_response(datasets, objects), answer


async def _objects_response(datasets: list, objects: DicomObjects) -> Response:
    """The SR alone (the first object) as application/dicom, or every object as multipart/related."""
    if objects == "sr":
        return Response(await asyncio.to_thread(encode, datasets[0]), media_type=DICOM)
    body, content_type = encode_related(await asyncio.to_thread(lambda: [encode(ds) for ds in datasets]))
    return Response(body, media_type=content_type)


async def dicom_series_response(service: InferenceService, instances: list[bytes], limits: SeriesLimits,
                                objects: DicomObjects) -> tuple[Response, DicomSeriesAnswer]:
    """Classify the instances of one DICOM series: (the response carrying its result objects, the answer
    they hold). For ``all``, the key slices are classified again with their CAM images for their
    overlays, as the series-mode listener does."""
    answered = await answer_dicom_series(service, instances, limits, source=True)
    slices = [ClassifiedSlice(a.source, None if s.frame_number is None else s.frame_number - 1, a.prediction)
              for s, a in zip(answered.result.slices, answered.answers)]
    series = ClassifiedSeries(slices, answered.result.finding, ordering=answered.result.ordering)
    if objects == "all":
        key = series.key
        overlays = await asyncio.gather(*(
            service.answer(instances[answered.instances[slices.index(s)]], DICOM, "png", batch_file=True,
                           frame_index=s.frame) for s in key))
        for s, overlay in zip(key, overlays):
            s.overlay = overlay.prediction
    datasets = await asyncio.to_thread(build_series_results, series)
    return await _objects_response(datasets, objects), answered
