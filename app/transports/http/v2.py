"""The Open Inference Protocol (KServe v2, Triton's HTTP API) beside the native API, so that KServe,
Triton clients and their tooling work unchanged:

    GET  /v2                              server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer    logits, calibrated probabilities, ood_score, tumour_map

Inputs: ``image`` FP32 ``[N, 3, S, S]``, preprocessed as the model's spec says (``GET /v1/model``),
or, as an extension, ``image_bytes`` BYTES ``[N]``: PNG, JPEG or DICOM files (base64 strings in
JSON), decoded and preprocessed by the service. Tensors travel as JSON ``data`` or with the binary
tensor extension (``Inference-Header-Content-Length``). Errors are problem+json whose ``error``
member is what the protocol's clients read.

The JSON is costed before it is parsed: parsing makes a Python object of every value, so a body
of ``[],`` (31 MB: 10 million lists, +1.2 GiB and 8 s of a blocked event loop in issue 21) is
refused (400 invalid-tensor) when it holds more values than the tensor shapes it declares can need, counted with
a scan of its bytes. What passes is parsed, and its tensors built, in a worker thread, one request
at a time, so the event loop (and ``/livez``) keeps answering.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import threading
from dataclasses import asdict
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.core.contract import OOD_NAME, TUMOUR_MAP_NAME
from app.core.decision import Decision, softmax
from app.core.errors import InvalidRequest, InvalidTensor, ModelNotFound, ServiceError
from app.engine.service import InferenceService, RawOutputs
from app.settings import Settings
from app.transports.http import openapi_docs as docs
from app.transports.http.problems import request_id_of
from app.transports.http.routes import audit_prediction, get_service, get_settings, probe_failed
from app.transports.http.v2_schemas import (
    InferRequest,
    InferResponse,
    LiveResponse,
    ModelMetadataV2,
    ModelReadyResponse,
    ReadyResponse,
    RequestInput,
    ServerMetadata,
)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

SERVER_NAME = "btd"
EXTENSIONS = ["binary_tensor_data"]
IMAGE_INPUT, BYTES_INPUT = "image", "image_bytes"
LOGITS_OUTPUT, PROBABILITIES_OUTPUT = "logits", "probabilities"
OOD_OUTPUT = OOD_NAME  # [N]: the model's out-of-distribution score, for a model that has one
# [N, 1, h, w]: a localising model's tumour probability over its input square (the service's region
# in /v1/predict is drawn from it, through the preprocessing framing, which a tensor input does not have)
MAP_OUTPUT = TUMOUR_MAP_NAME
HEADER_LENGTH = "inference-header-content-length"
BINARY_MEDIA_TYPE = "application/octet-stream"


def _server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("btd")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0"


# A path segment the server routes at all: control characters in a path are refused (400) before routing.
PathName = Annotated[str, Path(pattern=r"^[^\x00-\x1f\x7f]+$")]


def served_model(name: str, version: str | None, service: InferenceService) -> InferenceService:
    """The service when ``name`` (and ``version``, if given) is the loaded model, else 404."""
    meta = service.engine.metadata
    if name != meta.model_name or (version is not None and version != meta.model_version):
        shown = name if version is None else f"{name} version {version}"
        raise ModelNotFound(f"this server serves {meta.model_name} version {meta.model_version}, not {shown[:200]}")
    return service


@router.get("", operation_id="v2ServerMetadata", summary="Server metadata", response_model=ServerMetadata,
            responses=docs.V2_SERVER_RESPONSES)
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": _server_version(), "extensions": EXTENSIONS}


@router.get("/health/live", operation_id="v2Live", summary="The server is live", response_model=LiveResponse,
            responses=docs.LIVEZ_RESPONSES)
async def live(request: Request) -> Any:
    if request.app.state.runtime.load_error is not None:
        return probe_failed(request)
    return {"live": True}


@router.get("/health/ready", operation_id="v2Ready", summary="The server is ready (its model is)",
            response_model=ReadyResponse, responses=docs.NOT_READY_RESPONSES)
async def ready(request: Request) -> Any:
    if not request.app.state.runtime.ready:
        return probe_failed(request)
    return {"ready": True}


def _model_metadata(service: InferenceService) -> dict[str, Any]:
    meta = service.engine.metadata
    spec = meta.preprocess
    classes = len(meta.labels)
    map_shape = service.engine.runner.tumour_map_shape if service.engine.model.localises else None
    return {
        "name": meta.model_name,
        "versions": [meta.model_version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": IMAGE_INPUT, "datatype": "FP32", "shape": [-1, spec.channels, spec.size, spec.size]},
                   {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": LOGITS_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
                    {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
                    *([{"name": OOD_OUTPUT, "datatype": "FP32", "shape": [-1]}] if meta.ood is not None else []),
                    *([{"name": MAP_OUTPUT, "datatype": "FP32", "shape": [-1, 1, *map_shape]}] if map_shape else [])],
        "parameters": {"labels": list(meta.labels), "temperature": meta.temperature,
                       "tumour_threshold": service.engine.threshold, "sha256": service.engine.model.sha256,
                       **({"ood_threshold": meta.ood.threshold} if meta.ood is not None else {}),
                       **({"localisation": asdict(meta.localisation)} if map_shape and meta.localisation else {})},
    }


@router.get("/models/{model_name}", operation_id="v2ModelMetadata", summary="Model metadata",
            response_model=ModelMetadataV2, responses=docs.V2_MODEL_RESPONSES, openapi_extra=docs.KEY_SECURITY)
async def model_metadata(model_name: PathName, service: InferenceService = Depends(get_service)) -> dict[str, Any]:
    return _model_metadata(served_model(model_name, None, service))


@router.get("/models/{model_name}/versions/{model_version}", operation_id="v2ModelVersionMetadata",
            summary="Model metadata (one version)", response_model=ModelMetadataV2, responses=docs.V2_MODEL_RESPONSES,
            openapi_extra=docs.KEY_SECURITY)
async def model_version_metadata(model_name: PathName, model_version: PathName,
                                 service: InferenceService = Depends(get_service)) -> dict[str, Any]:
    return _model_metadata(served_model(model_name, model_version, service))


@router.get("/models/{model_name}/ready", operation_id="v2ModelReady", summary="The model is ready",
            response_model=ModelReadyResponse, responses=docs.V2_READY_RESPONSES)
async def model_ready(model_name: PathName, service: InferenceService = Depends(get_service)) -> dict[str, Any]:
    return {"name": served_model(model_name, None, service).engine.metadata.model_name, "ready": True}


@router.get("/models/{model_name}/versions/{model_version}/ready", operation_id="v2ModelVersionReady",
            summary="The model (one version) is ready", response_model=ModelReadyResponse,
            responses=docs.V2_READY_RESPONSES)
async def model_version_ready(model_name: PathName, model_version: PathName,
                              service: InferenceService = Depends(get_service)) -> dict[str, Any]:
    return {"name": served_model(model_name, model_version, service).engine.metadata.model_name, "ready": True}


# ---------------------------------------------------------------- infer: the request


async def read_body(request: Request) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it (empty without the binary extension)."""
    body = await request.body()
    declared = request.headers.get(HEADER_LENGTH)
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InvalidRequest(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 < length <= len(body):
            raise InvalidRequest(f"{HEADER_LENGTH} ({length}) does not fit the body ({len(body)} bytes)")
        return body[:length], body[length:]
    return body, b""


# Values a request holds besides its tensors' data: id, parameters, outputs (generous).
STRUCTURE_VALUES = 1024
MAX_SHAPE_DIMS = 8
_SHAPE = re.compile(rb'"shape"\s*:\s*\[([-+0-9\s,]{0,160})\]')


def json_values_at_most(header: bytes) -> int:
    """An upper bound of the values in a JSON text, from its bytes alone: every value but the first
    of an array or object follows a comma (commas and brackets inside strings only raise it; base64
    has none)."""
    return header.count(b",") + header.count(b"[") + header.count(b"{") + 1


def tensor_values(shape: list[int]) -> int:
    """The values of a tensor of ``shape`` as JSON at most: its elements, and the arrays of the
    nested form ([[...], [...]])."""
    values, arrays = 1, 0
    for dim in shape:
        arrays += values
        values *= max(dim, 0)
    return values + arrays


def declared_shapes(header: bytes) -> list[list[int]]:
    shapes = []
    for match in _SHAPE.finditer(header):
        try:
            dims = [int(d) for d in match.group(1).split(b",") if d.strip()]
        except ValueError:
            continue
        if len(dims) <= MAX_SHAPE_DIMS:
            shapes.append(dims)
    return shapes


def check_json_cost(header: bytes, largest_tensor: list[int]) -> None:
    """Refuse (400, as data that does not fit its shape) a JSON request with more values than the
    shapes it declares can need, each at most the largest tensor this model takes, before a parser
    makes an object of each value."""
    allowed = min(sum(tensor_values(s) for s in declared_shapes(header)), tensor_values(largest_tensor))
    allowed += STRUCTURE_VALUES
    found = json_values_at_most(header)
    if found > allowed:
        raise InvalidTensor(f"the JSON request holds up to {found} values; the tensor shapes it declares need "
                            f"at most {allowed}")


def parse_infer_request(header: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidRequest(f"not an inference request: {where}: {first.get('msg', 'invalid')}") from None


class BinaryReader:
    """Hands out the binary tensor data of the inputs in order (``parameters.binary_data_size`` each)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, size: Any, name: str) -> bytes:
        if not isinstance(size, int) or size < 0 or self.offset + size > len(self.data):
            raise InvalidTensor(f"input {name!r}: binary_data_size does not fit the binary data sent")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def check_consumed(self) -> None:
        if self.offset != len(self.data):
            raise InvalidTensor(f"{len(self.data) - self.offset} bytes of binary data belong to no input")


def _binary_size(item: RequestInput) -> Any:
    return (item.parameters or {}).get("binary_data_size")


def image_tensor(item: RequestInput, binary: BinaryReader, spec_shape: tuple[int, int, int],
                 max_batch: int) -> list[np.ndarray]:
    """``image`` FP32 [N, C, S, S] -> N model inputs."""
    if item.datatype != "FP32":
        raise InvalidTensor(f"input {IMAGE_INPUT!r} must be FP32, not {item.datatype[:32]}")
    expected = "[N, " + ", ".join(map(str, spec_shape)) + "]"
    if len(item.shape) != 4 or tuple(item.shape[1:]) != spec_shape or not 1 <= item.shape[0] <= max_batch:
        raise InvalidTensor(f"input {IMAGE_INPUT!r} has shape {item.shape[:8]}, expected {expected} with "
                            f"1 <= N <= {max_batch} (BTD_MAX_BATCH_FILES)")
    count = math.prod(item.shape)
    size = _binary_size(item)
    try:
        if size is not None:
            raw = binary.take(size, IMAGE_INPUT)
            if len(raw) != 4 * count:
                raise InvalidTensor(f"input {IMAGE_INPUT!r}: {len(raw)} bytes of binary data, shape needs {4 * count}")
            values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif item.data is not None:
            values = np.asarray(item.data, dtype=np.float32).reshape(-1)
        else:
            raise InvalidTensor(f"input {IMAGE_INPUT!r} has neither data nor binary_data_size")
    except (TypeError, ValueError):  # ragged or non-numeric JSON data
        raise InvalidTensor(f"input {IMAGE_INPUT!r}: data must be {count} numbers") from None
    if values.size != count:
        raise InvalidTensor(f"input {IMAGE_INPUT!r}: {values.size} values for shape {item.shape} ({count})")
    if not np.isfinite(values).all():
        raise InvalidTensor(f"input {IMAGE_INPUT!r} contains non-finite values")
    return list(values.reshape(item.shape))


def _split_bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """Triton's BYTES serialisation: each element as a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidTensor(f"input {BYTES_INPUT!r}: truncated element length")
        length = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise InvalidTensor(f"input {BYTES_INPUT!r}: an element runs past the binary data")
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise InvalidTensor(f"input {BYTES_INPUT!r}: {len(elements)} elements for shape [{count}]")
    return elements


def bytes_tensor(item: RequestInput, binary: BinaryReader, max_batch: int) -> list[bytes]:
    """``image_bytes`` BYTES [N] -> N image files."""
    if item.datatype != "BYTES":
        raise InvalidTensor(f"input {BYTES_INPUT!r} must be BYTES, not {item.datatype[:32]}")
    if len(item.shape) != 1 or not 1 <= item.shape[0] <= max_batch:
        raise InvalidTensor(f"input {BYTES_INPUT!r} has shape {item.shape[:8]}, expected [N] with "
                            f"1 <= N <= {max_batch} (BTD_MAX_BATCH_FILES)")
    count = item.shape[0]
    size = _binary_size(item)
    if size is not None:
        return _split_bytes_elements(binary.take(size, BYTES_INPUT), count)
    data = item.data
    if data is None or len(data) != count or not all(isinstance(e, str) for e in data):
        raise InvalidTensor(f"input {BYTES_INPUT!r}: data must be {count} base64 strings (or binary data)")
    try:
        return [base64.b64decode(e, validate=True) for e in data]
    except (binascii.Error, ValueError):
        raise InvalidTensor(f"input {BYTES_INPUT!r}: data must be base64 strings") from None


_PARSING = threading.Lock()  # one parse at a time: parsers hold the GIL, the event loop needs it between them


def parsed_inputs(header: bytes, binary: bytes, service: InferenceService,
                  max_batch: int) -> tuple[InferRequest, list[np.ndarray | bytes]]:
    """The request and its model inputs, from a header that ``check_json_cost`` admitted (in a thread)."""
    with _PARSING:
        infer = parse_infer_request(header)
        return infer, model_inputs(infer, binary, service, max_batch)


def model_inputs(infer: InferRequest, binary: bytes, service: InferenceService,
                 max_batch: int) -> list[np.ndarray | bytes]:
    if len(infer.inputs) != 1:
        raise InvalidTensor(f"send exactly one input: {IMAGE_INPUT!r} or {BYTES_INPUT!r}")
    item = infer.inputs[0]
    reader = BinaryReader(binary)
    spec = service.engine.metadata.preprocess
    if item.name == IMAGE_INPUT:
        inputs: list[np.ndarray | bytes] = list(image_tensor(item, reader, (spec.channels, spec.size, spec.size),
                                                             max_batch))
    elif item.name == BYTES_INPUT:
        inputs = list(bytes_tensor(item, reader, max_batch))
    else:
        raise InvalidTensor(f"unknown input {item.name[:64]!r}; this model takes {IMAGE_INPUT!r} or {BYTES_INPUT!r}")
    reader.check_consumed()
    return inputs


# ---------------------------------------------------------------- infer: the response


def _wants_binary(infer: InferRequest, output_parameters: dict[str, Any] | None) -> bool:
    if output_parameters and "binary_data" in output_parameters:
        return bool(output_parameters["binary_data"])
    return bool((infer.parameters or {}).get("binary_data_output", False))


def infer_response(infer: InferRequest, request_id: str, service: InferenceService, raw: RawOutputs) -> Response:
    meta = service.engine.metadata
    tensors = {LOGITS_OUTPUT: raw.logits.astype(np.float32),
               PROBABILITIES_OUTPUT: softmax(raw.logits, meta.temperature).astype(np.float32)}
    if raw.ood_score is not None:
        tensors[OOD_OUTPUT] = raw.ood_score.astype(np.float32)
    if raw.tumour_map is not None:
        tensors[MAP_OUTPUT] = raw.tumour_map.astype(np.float32)
    wanted = [(o.name, o.parameters) for o in infer.outputs or []] or [(name, None) for name in tensors]
    for name, params in wanted:
        if name not in tensors:
            raise InvalidTensor(f"unknown output {name[:64]!r}; this model answers {', '.join(tensors)}")
        if params and params.get("class_count"):
            raise InvalidTensor("the classification extension (class_count) is not supported; read "
                                f"{PROBABILITIES_OUTPUT!r} and the labels in the model metadata")
    outputs, blobs = [], []
    for name, params in wanted:
        tensor = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(tensor.shape)}
        if _wants_binary(infer, params):
            blob = tensor.astype("<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = [float(v) for v in tensor.reshape(-1)]
        outputs.append(out)
    body = {"model_name": meta.model_name, "model_version": meta.model_version, "id": infer.id or request_id,
            "outputs": outputs}
    if not blobs:
        return JSONResponse(body)
    header = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return Response(header + b"".join(blobs), media_type=BINARY_MEDIA_TYPE,
                    headers={"Inference-Header-Content-Length": str(len(header))})


def decisions(service: InferenceService, raw: RawOutputs) -> list[Decision]:
    """What the audit trail and the prediction records keep of each image of an inference (the
    client gets logits and probabilities): the decision /v1/predict would have answered (the same
    one: an out-of-distribution score over the model's threshold, or an image rule, makes no
    finding). Image bytes give their image rules' reasons (modality, head, size); a tensor gives none."""
    engine = service.engine
    scores = [None] * len(raw.logits) if raw.ood_score is None else [float(s) for s in raw.ood_score]
    reasons = raw.image_reasons or ([],) * len(raw.logits)
    return [engine.decide(logits, score, why) for logits, score, why in zip(raw.logits, scores, reasons)]


async def _infer(request: Request, name: str, version: str | None, service: InferenceService,
                 settings: Settings) -> Response:
    try:
        served_model(name, version, service)
        header, binary = await read_body(request)
        spec = service.engine.metadata.preprocess
        check_json_cost(header, [settings.max_batch_files, spec.channels, spec.size, spec.size])
        infer, inputs = await asyncio.to_thread(parsed_inputs, header, binary, service, settings.max_batch_files)
        raw = await service.infer_raw(inputs)
    except ServiceError as error:
        audit_prediction(request, service, error=error)
        raise
    facts = raw.facts or (None,) * len(raw.logits)
    for index, (decision, input_facts) in enumerate(zip(decisions(service, raw), facts)):
        audit_prediction(request, service, index=index, decision=decision, facts=input_facts)
    return infer_response(infer, request_id_of(request), service, raw)


@router.post("/models/{model_name}/infer", operation_id="v2ModelInfer", summary="Run the model",
             response_model=InferResponse, responses=docs.V2_INFER_RESPONSES, openapi_extra=docs.V2_INFER_BODY)
async def model_infer(request: Request, model_name: PathName, service: InferenceService = Depends(get_service),
                      settings: Settings = Depends(get_settings)) -> Response:
    return await _infer(request, model_name, None, service, settings)


@router.post("/models/{model_name}/versions/{model_version}/infer", operation_id="v2ModelVersionInfer",
             summary="Run the model (one version)", response_model=InferResponse, responses=docs.V2_INFER_RESPONSES,
             openapi_extra=docs.V2_INFER_BODY)
async def model_version_infer(request: Request, model_name: PathName, model_version: PathName,
                              service: InferenceService = Depends(get_service),
                              settings: Settings = Depends(get_settings)) -> Response:
    return await _infer(request, model_name, model_version, service, settings)
