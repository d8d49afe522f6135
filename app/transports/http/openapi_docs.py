"""OpenAPI text for the routes: request bodies (parsed by hand, so several media types can be
accepted) and every documented error status, all as ``application/problem+json``."""

from __future__ import annotations

from typing import Any

from app.core.formats import FORMATS

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
BINARY = {"type": "string", "format": "binary"}
REQUEST_ID_HEADER = {"X-Request-ID": {"description": "the client's X-Request-ID, or a generated UUID",
                                      "schema": {"type": "string"}}}


def problem(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/problem+json": {"schema": PROBLEM_REF}}}
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}

# API keys (optional: only when the server has keys configured, BTD_API_KEYS_FILE / BTD_API_KEYS).
SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "an API key (python -m app.transports.http.api_keys new NAME), required on /v1/* when the server "
                              "has keys configured; probes never need one"},
    "bearer": {"type": "http", "scheme": "bearer", "description": "the same API key as a Bearer token"},
}
KEY_SECURITY = {"security": [{"apiKey": []}, {"bearer": []}]}

_COMMON = {
    413: problem("payload-too-large: body over BTD_MAX_BODY_BYTES, image over BTD_MAX_PIXELS, or too many files"),
    415: problem("unsupported-media-type: not PNG/JPEG/DICOM, Content-Type does not match the bytes, or a "
                 "compressed DICOM transfer syntax with no decoder installed (named in detail)"),
    422: problem("validation-error: bad query parameter or missing multipart field; decode-too-costly: the decode ran past BTD_HOST_TASK_TIMEOUT_S, or a DICOM past its header limits (more than 100,000 elements, a huge multi-valued element); no-pixel-data: DICOM "
                 "without pixel data"),
    503: problem("model-not-ready: loading, warming up or shutting down; overloaded: the queue is full "
                 "(Retry-After)", **{"Retry-After": RETRY_AFTER}),
}

INVALID_HOST = "invalid-host: the Host header names none of BTD_ALLOWED_HOSTS (IP addresses are always served)"
_HOST = {400: problem(INVALID_HOST)}
_ACCESS = {
    401: problem("unauthorized: no API key, or not a valid one (when the server has keys configured)",
                 **{"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}),
    403: problem("forbidden: the API key lacks the predict scope; cross-site-request: a browser request from "
                 "another site (BTD_ALLOWED_ORIGINS)"),
}
AUTH_THROTTLED = ("rate-limited: more requests without a valid API key than BTD_AUTH_FAILURES_PER_MINUTE from "
                  "this client address (a valid key is still served)")
_AUTH_THROTTLED = {429: problem(AUTH_THROTTLED, **{"Retry-After": RETRY_AFTER})}
_UPLOAD = {
    408: problem("request-timeout: the body did not arrive within BTD_BODY_TIMEOUT_S"),
    429: problem("rate-limited: more prediction requests than BTD_RATE_LIMIT_PER_MINUTE from this client; or "
                 + AUTH_THROTTLED.removeprefix("rate-limited: "), **{"Retry-After": RETRY_AFTER}),
}

PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the prediction: JSON; or, for a DICOM input with format=dicom or a DICOM Accept header, "
                         "its result objects (DICOM Part 10): a Comprehensive SR (TID 1500) and the CAM overlay "
                         "(Secondary Capture) as multipart/related, or the SR alone as application/dicom",
          "headers": {
              **REQUEST_ID_HEADER,
              "Server-Timing": {"description": "decode, preprocess, queue, infer, cam, region, total (ms)",
                                "schema": {"type": "string"}}},
          "content": {
              "multipart/related": {"schema": {**BINARY, "description": 'type="application/dicom": one part per '
                                                                      "object, the SR first"}},
              "application/dicom": {"schema": {**BINARY, "description": "the SR"}}}},
    400: problem("invalid-image: empty, truncated or corrupt image data, a DICOM frame whose own header "
                 "contradicts Rows / Columns, or a DICOM without the UIDs its results must reference; "
                 "bad-request: malformed multipart body; " + INVALID_HOST),
    **_ACCESS,
    406: problem("not-acceptable: DICOM results asked for a PNG or JPEG input (they need a DICOM source)"),
    **_UPLOAD,
    **_COMMON,
    504: problem("timeout: processing took longer than BTD_REQUEST_TIMEOUT_S"),
}

BATCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "one result per file, in request order; a bad file has ok=false and its problem",
          "headers": REQUEST_ID_HEADER},
    400: problem("bad-request: malformed multipart body; " + INVALID_HOST),
    **_ACCESS,
    **_UPLOAD,
    413: _COMMON[413],
    415: problem("unsupported-media-type: the body is not multipart/form-data"),
    422: problem("validation-error: bad query parameter or no 'files' field"),
    503: _COMMON[503],
}

NOT_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_HOST,
    503: problem("model-not-ready: the model is not loaded, checked and warmed up yet, or the server is draining"),
}
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _ACCESS[401],
    403: problem("forbidden: the API key lacks the predict scope"),
    **_AUTH_THROTTLED,
    **NOT_READY_RESPONSES,
}

LIVEZ_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_HOST,
    503: problem("model-not-ready: the model failed to load; restart the process"),
}

METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    **_HOST,
    401: problem("unauthorized: with BTD_AUTH_METRICS and API keys, no valid key",
                 **{"WWW-Authenticate": {"description": "Basic", "schema": {"type": "string"}}}),
    403: problem("forbidden: with BTD_AUTH_METRICS, the API key lacks the metrics scope"),
    429: problem("rate-limited: with BTD_AUTH_METRICS, " + AUTH_THROTTLED.removeprefix("rate-limited: "),
                 **{"Retry-After": RETRY_AFTER}),
}

_FORMAT_NAMES = ", ".join(f.name.split(" ")[0] for f in FORMATS[:-1]) + " or " + FORMATS[-1].name.split(" ")[0]
PREDICT_BODY = {**KEY_SECURITY, "requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {**BINARY, "description": _FORMAT_NAMES}}}},
    **{f.media_type: {"schema": BINARY} for f in FORMATS},
    "application/octet-stream": {"schema": {**BINARY, "description": "any of the above, recognised by signature"}},
}}}

BATCH_BODY = {**KEY_SECURITY, "requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": BINARY, "description": "one part per image (BTD_MAX_BATCH_FILES at most)"},
    }}},
}}}

# ---------------------------------------------------------------- Open Inference Protocol (KServe v2)

_V2_ERROR = " (problem+json; its 'error' member is the protocol's error message)"
V2_SERVER_RESPONSES: dict[int | str, dict[str, Any]] = {**_HOST}
V2_MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_HOST,
    401: problem("unauthorized: no API key, or not a valid one (when the server has keys configured)" + _V2_ERROR,
                 **{"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}),
    403: problem("forbidden: the API key lacks the predict scope" + _V2_ERROR),
    404: problem("model-not-found: this server serves another model or version" + _V2_ERROR),
    422: problem("validation-error: a malformed path parameter" + _V2_ERROR),
    429: problem(AUTH_THROTTLED + _V2_ERROR, **{"Retry-After": RETRY_AFTER}),
    503: problem("model-not-ready: the model is not loaded, checked and warmed up yet, or the server is draining"
                 + _V2_ERROR),
}

# A model's readiness is a probe: open like /readyz, whatever the keys.
V2_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: response for code, response in V2_MODEL_RESPONSES.items() if code not in (401, 403, 429)}

V2_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "logits and calibrated probabilities [N, C] (class order: the model metadata's labels), "
                         "and ood_score [N] for a model with an out-of-distribution output (over the metadata's "
                         "ood_threshold: not a brain MR slice the model knows); "
                         "with the binary tensor extension the JSON header is followed by the raw tensors",
          "headers": {**REQUEST_ID_HEADER,
                      "Inference-Header-Content-Length": {"description": "binary tensor extension: length of the "
                                                          "JSON header", "schema": {"type": "integer"}}},
          "content": {"application/octet-stream": {"schema": {**BINARY, "description": "JSON header, then tensors"}}}},
    400: problem("invalid-tensor: unknown input or output, wrong datatype or shape, data that does not fill the "
                 "shape (or JSON with more values than its declared shapes need, refused before parsing), "
                 "non-finite values; invalid-image: an image_bytes element is not a readable image; "
                 + INVALID_HOST + _V2_ERROR),
    401: V2_MODEL_RESPONSES[401],
    403: problem("forbidden: the API key lacks the predict scope; cross-site-request: a browser request from "
                 "another site" + _V2_ERROR),
    404: V2_MODEL_RESPONSES[404],
    408: problem("request-timeout: the body did not arrive within BTD_BODY_TIMEOUT_S" + _V2_ERROR),
    429: problem("rate-limited: more prediction requests than BTD_RATE_LIMIT_PER_MINUTE from this client; or "
                 + AUTH_THROTTLED.removeprefix("rate-limited: ") + _V2_ERROR, **{"Retry-After": RETRY_AFTER}),
    413: problem("payload-too-large: body over BTD_MAX_BODY_BYTES or image over BTD_MAX_PIXELS" + _V2_ERROR),
    415: problem("unsupported-media-type: an image_bytes element is not PNG, JPEG or DICOM" + _V2_ERROR),
    422: problem("validation-error: the body is not an inference request; no-pixel-data: a DICOM without pixels"
                 + _V2_ERROR),
    503: problem("model-not-ready or overloaded (Retry-After)" + _V2_ERROR, **{"Retry-After": RETRY_AFTER}),
    504: problem("timeout: processing took longer than BTD_REQUEST_TIMEOUT_S" + _V2_ERROR),
}

V2_INFER_BODY = {**KEY_SECURITY, "requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
    "application/octet-stream": {"schema": {**BINARY, "description": "binary tensor extension: the JSON request "
                                            "(Inference-Header-Content-Length bytes), then each input's "
                                            "parameters.binary_data_size bytes in order"}},
}}}
