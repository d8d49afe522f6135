"""Open Inference Protocol (KServe v2 / Triton) REST shapes, for validation and the OpenAPI document.
See https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, Any]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(..., examples=["FP32"])
    shape: list[int] = Field(..., description="-1 for a dynamic dimension")


class ModelMetadataV2(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters = Field(default_factory=dict, description="extension: labels (the order of the "
                                   "class axis), calibration temperature, tumour threshold, ood_threshold (models with an ood_score output), "
                                   "localisation (models with a tumour_map output: how the service reads it)")


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent when the tensor is sent "
                                   "as binary data (parameters.binary_data_size)")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: Parameters | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(..., min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[float] | None = Field(None, description="row-major, flat; absent when sent as binary data")


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]
