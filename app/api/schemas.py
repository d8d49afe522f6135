"""Response shapes, for validation of what we send and for the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.contract import PreprocessSpec


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


class ModelIdentity(BaseModel):
    name: str
    version: str
    sha256: str = Field(..., pattern="^[0-9a-f]{64}$")


class CamPng(BaseModel):
    format: Literal["png"]
    label: str = Field(..., description="the class the map explains (the predicted one)")
    width: int = Field(..., ge=1)
    height: int = Field(..., ge=1)
    image_png: str = Field(..., description="base64 PNG: the input slice as the model saw it, 8-bit gray")
    heatmap_png: str = Field(..., description="base64 RGBA PNG, same size: colour-mapped CAM, alpha follows it")
    overlay_png: str = Field(..., description="base64 PNG: the heatmap blended onto the image")


class CamGrid(BaseModel):
    format: Literal["grid"]
    label: str = Field(..., description="the class the map explains (the predicted one)")
    shape: list[int] = Field(..., min_length=2, max_length=2, description="[h, w] at feature resolution")
    grid: list[list[float]] = Field(..., description="the CAM normalised to [0, 1], h rows of w values")


class Timings(BaseModel):
    decode: float
    preprocess: float
    queue: float
    inference: float
    cam: float
    total: float


class PredictResponse(BaseModel):
    request_id: str
    model: ModelIdentity
    label: str
    probabilities: dict[str, float] = Field(..., description="calibrated (temperature-scaled), sum to 1")
    tumour_probability: float | None = Field(..., description="1 - p(notumor); null without that class")
    tumour_detected: bool | None = Field(..., description="tumour_probability >= threshold")
    threshold: float
    cam: Annotated[CamPng | CamGrid, Field(discriminator="format")] | None
    timings_ms: Timings
    warnings: list[str]


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


class ModelDescription(BaseModel):
    name: str
    version: str
    sha256: str
    labels: list[str]
    input: PreprocessSpec = Field(..., description="the preprocessing the model expects (app.contract)")
    temperature: float
    threshold: float
    metrics: dict[str, Any]
    training_data: dict[str, Any]
    provider: str = Field(..., description="the ONNX Runtime execution provider running the model")
    providers: list[str] = Field(..., description="the providers of the session, in order of preference")


class Health(BaseModel):
    status: Literal["ok"]
