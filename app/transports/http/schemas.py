"""Response shapes, for validation of what we send and for the OpenAPI document."""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from app.core.contract import LocalisationSpec, OodSpec, PreprocessSpec, ValidatedUse
from app.core.result import Prediction


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


def _response_model() -> type[BaseModel]:
    """``PredictResponse``: ``request_id`` and then every field of the core's ``Prediction`` (one
    definition of the result's shape, in ``app.core.result``)."""
    hints = typing.get_type_hints(Prediction, include_extras=True)
    fields: dict[str, Any] = {"request_id": (str, ...)}
    for f in dataclasses.fields(Prediction):
        if f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
    return create_model("PredictResponse", __doc__="One prediction.", **fields)


PredictResponse = _response_model()


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
                                        "another is not assessed (ood_reasons plane, sequence)")
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


class Health(BaseModel):
    status: Literal["ok"]
