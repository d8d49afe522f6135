"""Response shapes, for validation of what we send and for the OpenAPI document."""

from __future__ import annotations

import dataclasses
import typing
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from app.core.contract import LocalisationSpec, OodSpec, PreprocessSpec, ValidatedUse
from app.core.result import Prediction
from app.core.series import SeriesResult
from app.engine.records.feedback import READER_ID_PATTERN


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(..., examples=["/problems/invalid-image"])
    title: str
    status: int = Field(..., ge=400, le=599)
    detail: str
    instance: str = Field(..., description="the request path")
    request_id: str
    errors: list[dict[str, Any]] | None = Field(None, description="validation errors (422 validation-error only)")


def _response_model(result: type, name: str, doc: str) -> type[BaseModel]:
    """``request_id`` and then every field of a core result dataclass (one definition of the result's
    shape, in ``app.core``)."""
    hints = typing.get_type_hints(result, include_extras=True)
    fields: dict[str, Any] = {"request_id": (str, ...)}
    for f in dataclasses.fields(result):
        if f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
    return create_model(name, __doc__=doc, **fields)


PredictResponse = _response_model(Prediction, "PredictResponse", "One prediction.")
SeriesResponse = _response_model(SeriesResult, "SeriesResponse", "A series: its finding and its slices' predictions, "
                                 "in slice order.")


class BatchItemOk(BaseModel):
    filename: str
    ok: Literal[True]
    result: PredictResponse


class BatchItemError(BaseModel):
    filename: str
    ok: Literal[False]
    problem: Problem


class BatchResponse(BaseModel):
    results: list[Annotated[BatchItemOk | BatchItemError, Field(discriminator="ok")]]


class InputFormat(BaseModel):
    media_type: str
    name: str
    suffixes: list[str] = Field(..., description="file name endings of this format, lower case, with the dot")


class ModelDescription(BaseModel):
    name: str
    version: str
    sha256: str
    labels: list[str]
    input: PreprocessSpec = Field(..., description="the preprocessing the model expects (app.core.contract)")
    temperature: float
    threshold: float
    metrics: dict[str, Any]
    training_data: dict[str, Any]
    provider: str = Field(..., description="the ONNX Runtime execution provider running the model")
    providers: list[str] = Field(..., description="the providers of the session, in order of preference")
    variant: Literal["fp32", "fp16", "int8"] = Field(
        ..., description="which file of the model is served: the model file (fp32) or its fp16 / int8 variant")
    batch_buckets: list[int] = Field(..., description="the batch sizes the model runs at (batches are padded up)")
    model_runs: int = Field(..., description="batches the model runs at once (BTD_MODEL_RUNS)")
    intra_op_threads: int = Field(..., description="ONNX Runtime intra-op threads of each run (BTD_INTRA_OP_THREADS)")
    ood: OodSpec | None = Field(..., description="how the model's out-of-distribution score is read; null when the "
                                "model has no such output")
    validated_for: ValidatedUse = Field(..., description="the planes and sequences the model is validated for (its "
                                        "metadata, else release 1.2.0's list): an MR DICOM whose headers say "
                                        "another is not assessed (ood_reasons plane, sequence); specific_sequences: "
                                        "those on which a tumour call is specific too (elsewhere a tumour call "
                                        "carries a warning)")
    localisation: LocalisationSpec | None = Field(
        None, description="how the model's tumour map becomes the tumour region (region in /v1/predict); null when "
        "the model has no tumour map: then no region is reported")
    formats: list[InputFormat] = Field(..., description="the image formats /v1/predict reads (app.core.formats)")
    max_batch_size: int = Field(..., description="the largest batch the micro-batcher sends to the model")
    max_wait_ms: float = Field(..., description="longest the oldest request waits for others to fill a batch "
                               "(BTD_MAX_WAIT_MS; auto: 0 on the CPU provider, 5 on GPU providers)")
    host_workers: int = Field(..., description="processes (or threads) that decode and preprocess")
    host_work: Literal["processes", "threads"]
    isolated_decoders: Literal["all", "dicom", "none"] = Field(
        ..., description="which decodes run in worker processes (memory and time limits, a crash costs the worker "
        "only): all, DICOM only (the CPU default: pydicom's codecs hold the GIL), or none (BTD_HOST_WORKERS=0)")


class DriftPoint(BaseModel):
    end: str | None = Field(..., description="when the window's last answer was given (UTC)")
    records: int = Field(..., description="answers in the window")
    psi: float | None
    ks: float | None


class SignalDrift(BaseModel):
    psi: float | None = Field(..., description="population stability index of the current window against the "
                              "validation baseline; null when no answer in it had this signal")
    ks: float | None = Field(..., description="Kolmogorov-Smirnov statistic at the baseline's bin edges "
                             "(continuous signals)")
    records: int = Field(..., description="answers in the window with a value for this signal")
    over_threshold: bool = Field(..., description="PSI over the threshold with at least min_records answers")
    threshold: float
    window: int
    history: list[DriftPoint] = Field(..., description="drift over time: consecutive windows of the newest "
                                      "answers, oldest first; the last is the current window")


class DriftRuleModel(BaseModel):
    psi_threshold: float
    min_records: int
    window: int


class DriftReport(BaseModel):
    status: Literal["pending", "ok", "alert", "no-baseline", "no-records", "unavailable"] = Field(
        ..., description="alert: a signal breaks the rule; no-baseline: the model has none (btd baseline); "
        "no-records: records are off or none yet; unavailable: the records database cannot be read")
    reason: str | None
    alert: bool
    refreshed_at: str | None = Field(..., description="when drift was last measured (BTD_DRIFT_INTERVAL_S)")
    rule: DriftRuleModel
    baseline: dict[str, Any] | None = Field(..., description="the validation baseline's size and source")
    window_records: int
    signals: dict[str, SignalDrift] = Field(..., description="by signal: class_mix, tumour_probability, "
                                            "ood_score, intensity")


class MonitoringReport(BaseModel):
    model_name: str
    model_version: str
    drift: DriftReport
    performance: dict[str, Any] | None = Field(
        ..., description="live performance against readers' feedback per model version (confirmed cases, "
        "sensitivity, specificity, class agreement with 95% Wilson intervals, calibration error with its "
        "reliability bins, the confusion matrix of the model's class against the readers'; the shape of "
        "app.engine.monitoring.performance.performance_report), as last refreshed (BTD_PERFORMANCE_INTERVAL_S); "
        "null without records or before the first refresh")


class Health(BaseModel):
    status: Literal["ok"]


# A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters.
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


class FeedbackRequest(BaseModel):
    """A reader's finding on one recorded prediction, named by ``request_id`` (and ``item`` for one image
    of a batch or Open Inference Protocol request) or by ``sop_instance_uid`` (a PACS result's source)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str | None = Field(None, min_length=1, max_length=128, description="the answer's request_id")
    item: int | None = Field(None, ge=0, le=1_000_000, description="the image's index in its request (a batch or "
                             "an Open Inference Protocol request of several images); only with request_id")
    sop_instance_uid: str | None = Field(None, max_length=64, pattern=UID_PATTERN,
                                         description="the SOP Instance UID of the slice a PACS result was made from "
                                         "(its SR references it); matched by hash, never stored")
    label: str | None = Field(None, min_length=1, max_length=64, description="the class the reader found: one of the "
                              "labels of the model that answered (GET /v1/model)")
    tumour_present: bool | None = Field(None, description="whether the reader found a tumour; with label, the two "
                                        "must agree (the no-tumour label means false)")
    reader_id: str | None = Field(None, pattern=READER_ID_PATTERN, description="a pseudonymous reader id (letters, "
                                  "digits, - and _; 64 at most), never a name: one reading per prediction and reader. "
                                  "Absent: the anonymous reader")

    @model_validator(mode="after")
    def _one_prediction(self) -> FeedbackRequest:
        if (self.request_id is None) == (self.sop_instance_uid is None):
            raise ValueError("name the prediction by request_id or by sop_instance_uid (one of them)")
        if self.item is not None and self.request_id is None:
            raise ValueError("item goes with request_id")
        if self.label is None and self.tumour_present is None:
            raise ValueError("give the reader's finding: label and/or tumour_present")
        return self


class FeedbackModel(BaseModel):
    name: str
    version: str


class FeedbackPrediction(BaseModel):
    label: str = Field(..., description="the class the model answered")
    tumour_detected: bool | None = Field(..., description="the model's tumour decision (null: none was made)")


class FeedbackResponse(BaseModel):
    """The stored reading. ``outcome``: created (201), unchanged (200: the same finding sent again) or
    replaced (200: the same reader's correction)."""

    feedback_id: int
    outcome: Literal["created", "unchanged", "replaced"]
    request_id: str = Field(..., description="the request_id of the prediction the feedback joined")
    item: int | None
    model: FeedbackModel = Field(..., description="the model that made the prediction")
    prediction: FeedbackPrediction
    reader_id: str | None
    label: str | None = Field(..., description="the reader's class")
    tumour_present: bool | None = Field(..., description="the reader's tumour finding (filled in from the label "
                                        "when the model has a no-tumour class)")
    created_at: datetime
    updated_at: datetime
