"""HTTP routes: parse the request, call the inference service, shape the response. Nothing else."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.decision import Decision
from app.core.decode import DICOM, MEDIA_TYPES, normalise_media_type
from app.core.errors import (
    BadRequest,
    InvalidRequest,
    ModelNotReady,
    NotAcceptable,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from app.core.nifti import looks_like_nifti
from app.core.result import ModelIdentity, Prediction, Timings
from app.engine import metrics
from app.engine.pipeline import CamMode, InputFacts
from app.engine.records.rows import prediction_row
from app.engine.records.writer import RecordWriter
from app.engine.series import answer_dicom_series, answer_volume
from app.engine.service import InferenceService
from app.settings import Settings
from app.transports.http import openapi_docs as docs
from app.transports.http.audit import AuditLog
from app.transports.http.dicom import (
    ResultFormat,
    dicom_objects_wanted,
    dicom_response,
    dicom_series_response,
)
from app.transports.http.middleware import route_template
from app.transports.http.problems import problem_of, problem_response, request_id_of
from app.transports.http.schemas import (
    BatchResponse,
    Health,
    ModelDescription,
    MonitoringReport,
    PredictResponse,
    SeriesResponse,
)
from app.transports.pacs.multipart import decode_related, media_type_params

router = APIRouter()

CAM_QUERY = Query("none", description="class activation map: none, png (images, base64) or grid (numbers)")
FORMAT_QUERY = Query("json", alias="format", description="json, or dicom: a DICOM input's result objects as "
                     "multipart/related (a slice: a Comprehensive SR and the CAM overlay as Secondary Capture; a "
                     "series: its SR, Key Object Selection, key slices' overlays and tumour-region Segmentation); the "
                     'same as Accept: multipart/related; type="application/dicom". Accept: application/dicom gives '
                     "the SR alone")
SERVER_TIMING = (*metrics.STAGES.items(), ("total", "total"))  # (metric name, timings_ms key)


def get_settings(request: Request) -> Settings:
    """The app's settings; tests may override this dependency."""
    return request.app.state.settings


def get_service(request: Request) -> InferenceService:
    """The loaded inference service, or 503 until the model is loaded, checked and warmed up."""
    state = request.app.state.runtime
    if state.service is None:
        raise ModelNotReady(state.not_ready_reason())
    return state.service


def _bare(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def _read_form(request: Request, max_files: int):
    try:
        return await request.form(max_files=max_files, max_fields=16)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise PayloadTooLarge(f"at most {max_files} file(s) per request") from None
        raise


async def _read_upload(upload: UploadFile) -> tuple[bytes, str | None]:
    try:
        return await upload.read(), upload.content_type
    finally:
        await upload.close()


async def read_single_image(request: Request) -> tuple[bytes, str | None]:
    """The image of ``POST /v1/predict``: multipart field ``file``, or the raw body."""
    content_type = _bare(request.headers.get("content-type"))
    if content_type == "multipart/form-data":
        form = await _read_form(request, max_files=1)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the multipart body needs a file field named 'file'")
        return await _read_upload(upload)
    if content_type and normalise_media_type(content_type) in (*MEDIA_TYPES, None):  # None: sniff the bytes
        return await request.body(), content_type
    raise UnsupportedMediaType(
        "send multipart/form-data with a 'file' field, or the raw image with Content-Type "
        f"{', '.join(MEDIA_TYPES)}"
    )


def _server_timing(timings: Timings) -> str:
    return ", ".join(f"{name};dur={getattr(timings, key):.3f}" for name, key in SERVER_TIMING)


def audit_prediction(request: Request, service: InferenceService, *, index: int | None = None,
                     result: Prediction | None = None, decision: Decision | None = None,
                     facts: InputFacts | None = None, error: ServiceError | None = None,
                     model: ModelIdentity | None = None) -> None:
    """The audit line of one prediction, answered (``result``, or its ``decision`` where there is no
    ``Prediction``, as for v2 logits) or refused (``error``); and an answer's prediction record
    (``BTD_RECORDS``), from the same values, with what ``facts`` says of its input. The model named is
    the one that answered (``result.model``, or ``model`` for a decision), not the live one: a model
    swap may have come in between."""
    audit: AuditLog = request.app.state.audit
    answer = result if result is not None else decision
    fields: dict[str, Any] = {}
    if answer is not None:
        fields = {"label": answer.label, "tumour_probability": answer.tumour_probability,
                  "tumour_detected": answer.tumour_detected, "threshold": answer.threshold,
                  "in_distribution": answer.in_distribution}
    if result is not None:
        fields["timings_ms"] = asdict(result.timings_ms)
    request_id, route = request_id_of(request), route_template(request.scope)
    model = result.model if result is not None else model or service.engine.model_identity
    audit.prediction(
        request_id=request_id, key=getattr(request.state, "api_key", None),
        client=request.client.host if request.client else None, route=route, index=index,
        status=200 if error is None else error.status, problem=None if error is None else error.slug,
        model=asdict(model), **fields)
    records: RecordWriter | None = getattr(request.app.state, "records", None)
    if records is not None and answer is not None and error is None:
        records.add(prediction_row(request_id=request_id, transport="http-v2" if result is None else "http-v1",
                                   model=model, answer=answer, facts=facts, item=index, route=route))


@router.post("/v1/predict", operation_id="predict", summary="Classify one slice (PNG, JPEG or DICOM)",
             response_model=PredictResponse, responses=docs.PREDICT_RESPONSES, openapi_extra=docs.PREDICT_BODY)
async def predict(request: Request, cam: CamMode = CAM_QUERY, result_format: ResultFormat = FORMAT_QUERY,
                  service: InferenceService = Depends(get_service)) -> Response:
    try:
        data, media_type = await read_single_image(request)
        objects = dicom_objects_wanted(result_format, request.headers.get("accept"))
        if objects is not None:
            dicom, answer = await dicom_response(service, data, media_type, objects)
        else:
            answer = await service.answer(data, media_type, cam, request_id=request_id_of(request))
    except ServiceError as error:
        audit_prediction(request, service, error=error)
        raise
    result = answer.prediction
    audit_prediction(request, service, result=result, facts=answer.facts)
    if objects is not None:
        dicom.headers["Server-Timing"] = _server_timing(result.timings_ms)
        return dicom
    # Serialised straight from the typed result (response_model documents it; the API tests check
    # every answer against the committed spec).
    return Response(result.to_json(request_id_of(request)), media_type="application/json",
                    headers={"Server-Timing": _server_timing(result.timings_ms)})


@router.post("/v1/predict/batch", operation_id="predictBatch", summary="Classify several slices in one request",
             response_model=BatchResponse, responses=docs.BATCH_RESPONSES, openapi_extra=docs.BATCH_BODY)
async def predict_batch(request: Request, cam: CamMode = CAM_QUERY,
                        service: InferenceService = Depends(get_service),
                        settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    try:
        if _bare(request.headers.get("content-type")) != "multipart/form-data":
            raise UnsupportedMediaType("send multipart/form-data with one 'files' field per image")
        service.refuse_if_full()  # an overloaded server answers the whole batch 503 + Retry-After
        form = await _read_form(request, max_files=settings.max_batch_files)
        uploads = [u for u in form.getlist("files") if isinstance(u, UploadFile)]
        if not uploads:
            raise InvalidRequest("the multipart body needs at least one file field named 'files'")
    except ServiceError as error:  # the whole request refused: one line without a file index
        audit_prediction(request, service, error=error)
        raise
    request_id = request_id_of(request)

    async def one(index: int, upload: UploadFile) -> dict[str, Any]:
        filename = upload.filename or f"file{index + 1}"
        data, media_type = await _read_upload(upload)
        try:
            answer = await service.answer(data, media_type, cam, batch_file=True, request_id=request_id, item=index)
        except ServiceError as error:  # one bad file does not fail the others
            metrics.ERRORS.labels(error.slug).inc()
            audit_prediction(request, service, index=index, error=error)
            return {"filename": filename, "ok": False, "problem": problem_of(error, request.url.path, request_id)}
        result = answer.prediction
        audit_prediction(request, service, index=index, result=result, facts=answer.facts)
        return {"filename": filename, "ok": True, "result": {"request_id": request_id, **result.to_dict()}}

    # All at once, so they meet in the micro-batcher; gather keeps request order.
    return {"results": await asyncio.gather(*(one(i, u) for i, u in enumerate(uploads)))}


# What a NIfTI body may say it is; the bytes decide (gzip's signature, then the NIfTI header: app.core.nifti).
NIFTI_MEDIA_TYPES = ("", "application/octet-stream", "application/gzip", "application/x-gzip", "application/x-nifti",
                     "application/nifti")


async def read_series(request: Request, max_slices: int) -> tuple[list[bytes], bytes | None]:
    """(DICOM instances, None) of a multipart/related body, or ([], the NIfTI volume's bytes). More parts
    than ``max_slices`` (each instance is a slice at least) are refused before they are split."""
    content_type = request.headers.get("content-type") or ""
    bare, params = media_type_params(content_type)
    if bare == "multipart/related":
        if params.get("type", DICOM).lower() != DICOM:
            raise UnsupportedMediaType('a series in multipart/related must have type="application/dicom" parts')
        body = await request.body()
        delimiter = b"--" + params.get("boundary", "").encode("latin-1")
        if params.get("boundary") and body.count(delimiter) - 1 > max_slices:
            raise PayloadTooLarge(f"the series has more than {max_slices} parts (BTD_MAX_SERIES_SLICES)")
        try:
            parts = decode_related(body, content_type)
        except ValueError as exc:
            raise BadRequest(f"the multipart/related body is malformed: {exc}") from None
        if not parts:
            raise BadRequest("the series has no DICOM instance")
        if any(media_type_params(part_type)[0] not in (DICOM, "") for part_type, _ in parts):
            raise UnsupportedMediaType("every part of a series must be application/dicom")
        return [data for _, data in parts], None
    if bare in NIFTI_MEDIA_TYPES:
        data = await request.body()
        if not data:
            raise BadRequest("the body is empty: send a NIfTI volume or multipart/related DICOM instances")
        if not looks_like_nifti(data):
            raise UnsupportedMediaType("the body is not a NIfTI volume (.nii or .nii.gz); send DICOM instances as "
                                       'multipart/related; type="application/dicom"')
        return [], data
    raise UnsupportedMediaType('send DICOM instances as multipart/related; type="application/dicom", or one NIfTI '
                               f"volume as {', '.join(t for t in NIFTI_MEDIA_TYPES if t)}")


@router.post("/v1/predict/series", operation_id="predictSeries",
             summary="Classify a series: DICOM instances of one series, or a NIfTI volume",
             response_model=SeriesResponse, responses=docs.SERIES_RESPONSES, openapi_extra=docs.SERIES_BODY)
async def predict_series(request: Request, cam: CamMode = CAM_QUERY, result_format: ResultFormat = FORMAT_QUERY,
                         service: InferenceService = Depends(get_service),
                         settings: Settings = Depends(get_settings)) -> Response:
    dicom = None
    try:
        objects = dicom_objects_wanted(result_format, request.headers.get("accept"))
        limits = settings.series_limits()
        instances, volume = await read_series(request, limits.max_slices)
        if volume is not None:
            if objects is not None:
                raise NotAcceptable("DICOM results need DICOM instances: they copy the source study's patient and "
                                    "study and reference its slices, and a NIfTI volume has none; ask for JSON")
            series, facts = await answer_volume(service, volume, limits, cam)
        elif objects is not None:
            dicom, answered = await dicom_series_response(service, instances, limits, objects)
            series, facts = answered.result, answered.facts
        else:
            answered = await answer_dicom_series(service, instances, limits, cam)
            series, facts = answered.result, answered.facts
    except ServiceError as error:
        audit_prediction(request, service, error=error)
        raise
    for item, fact in zip(series.slices, facts):
        audit_prediction(request, service, index=item.index, result=item.result, facts=fact)
    if dicom is not None:
        return dicom
    body = {"request_id": request_id_of(request), **series.to_dict()}
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


@router.get("/v1/model", operation_id="getModel", summary="The loaded model: labels, input, metrics, provider",
            response_model=ModelDescription, responses=docs.MODEL_RESPONSES, openapi_extra=docs.KEY_SECURITY)
async def get_model(service: InferenceService = Depends(get_service)) -> dict[str, Any]:
    return service.describe()


@router.get("/v1/monitoring", operation_id="getMonitoring",
            summary="Drift of recent answers against the model's validation baseline; live performance",
            response_model=MonitoringReport, responses=docs.MODEL_RESPONSES, openapi_extra=docs.KEY_SECURITY)
async def get_monitoring(request: Request, service: InferenceService = Depends(get_service)) -> dict[str, Any]:
    meta = service.engine.metadata
    monitor = request.app.state.monitor  # set with the service (app.transports.http.main)
    # Live performance as last refreshed off the request path (BTD_PERFORMANCE_INTERVAL_S); null without
    # records, with the interval 0, or before the first refresh.
    exporter = request.app.state.performance
    return {"model_name": meta.model_name, "model_version": meta.model_version,
            "drift": monitor.report, "performance": None if exporter is None else exporter.last}


def probe_failed(request: Request) -> JSONResponse:
    """A health probe's 503: a state (loading, draining, failed), not an error. Probes come every few
    seconds, so it is neither logged as a warning nor counted in ``btd_errors_total``; ``btd_ready``
    shows it."""
    reason = request.app.state.runtime.not_ready_reason()
    body = problem_of(ModelNotReady(reason), request.url.path, request_id_of(request))
    return problem_response(body, is_error=False)


@router.get("/livez", operation_id="livez", summary="The process is alive", response_model=Health,
            responses=docs.LIVEZ_RESPONSES)
async def livez(request: Request) -> Any:
    if request.app.state.runtime.load_error is not None:
        return probe_failed(request)
    return {"status": "ok"}


@router.get("/readyz", operation_id="readyz",
            summary="Ready for traffic: model loaded, contract checked, warmed up, not draining",
            response_model=Health, responses=docs.NOT_READY_RESPONSES)
async def readyz(request: Request) -> Any:
    if not request.app.state.runtime.ready:
        return probe_failed(request)
    return {"status": "ok"}


@router.get("/metrics", operation_id="metrics", summary="Prometheus metrics", response_class=Response,
            responses=docs.METRICS_RESPONSES)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
