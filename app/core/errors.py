"""Errors named by condition. Each carries the HTTP status and problem type it maps to;
the HTTP layer renders them all as RFC 9457 problem+json in one handler."""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    title: str = "Internal error"
    slug: str = "internal-error"  # problem type: /problems/<slug>

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}


class InvalidImage(ServiceError):
    status, title, slug = 400, "Invalid image", "invalid-image"


class UnsupportedMediaType(ServiceError):
    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class NoPixelData(ServiceError):
    status, title, slug = 422, "No pixel data", "no-pixel-data"


class PayloadTooLarge(ServiceError):
    status, title, slug = 413, "Payload too large", "payload-too-large"


class ModelNotReady(ServiceError):
    status, title, slug = 503, "Model not ready", "model-not-ready"


class Overloaded(ServiceError):
    status, title, slug = 503, "Overloaded", "overloaded"


class InferenceTimeout(ServiceError):
    status, title, slug = 504, "Inference timed out", "timeout"


class DecodeTooCostly(ServiceError):
    """The image's decode ran past BTD_HOST_TASK_TIMEOUT_S in its own process: a legal slice decodes in a
    fraction of that, so the cost is the input's (a CPU bomb), not the server's fault."""

    status, title, slug = 422, "Image too costly to decode", "decode-too-costly"


class InvalidRequest(ServiceError):
    """The request is well-formed HTTP but not what the operation expects (e.g. no ``file`` field)."""

    status, title, slug = 422, "Validation error", "validation-error"


class BadRequest(ServiceError):
    """Not a request this server can route: e.g. control characters in the path."""

    status, title, slug = 400, "Bad request", "bad-request"


class InvalidHost(ServiceError):
    """The Host header names a server this is not (BTD_ALLOWED_HOSTS): DNS rebinding, or a misrouted request."""

    status, title, slug = 400, "Invalid host", "invalid-host"


class Unauthorized(ServiceError):
    status, title, slug = 401, "Unauthorized", "unauthorized"


class Forbidden(ServiceError):
    """A valid API key without the scope this route needs."""

    status, title, slug = 403, "Forbidden", "forbidden"


class CrossSiteRequest(ServiceError):
    """A browser sent a state-changing request from another site (BTD_ALLOWED_ORIGINS admits some)."""

    status, title, slug = 403, "Cross-site request refused", "cross-site-request"


class RequestTimeout(ServiceError):
    status, title, slug = 408, "Request timeout", "request-timeout"


class RateLimited(ServiceError):
    status, title, slug = 429, "Too many requests", "rate-limited"


class HeadersTooLarge(ServiceError):
    status, title, slug = 431, "Request header fields too large", "headers-too-large"


class ClientDisconnected(ServiceError):
    """The client hung up before its request was read: its fault, not ours. 499 as nginx counts it;
    nobody receives the response."""

    status, title, slug = 499, "Client closed request", "client-disconnected"


class NotAcceptable(ServiceError):
    """The client asked for a representation this input cannot have (DICOM results of a PNG)."""

    status, title, slug = 406, "Not acceptable", "not-acceptable"


class ModelNotFound(ServiceError):
    """An Open Inference Protocol path names a model (or version) this server does not serve."""

    status, title, slug = 404, "Model not found", "model-not-found"


class InvalidTensor(ServiceError):
    """An Open Inference Protocol request whose tensors do not fit the model (name, type, shape, data)."""

    status, title, slug = 400, "Invalid tensor", "invalid-tensor"


class PredictionNotFound(ServiceError):
    """Readers' feedback names a prediction that was never recorded here, or was pruned since."""

    status, title, slug = 404, "Prediction not found", "prediction-not-found"


class FeedbackOff(ServiceError):
    """Readers' feedback joins the prediction records: with BTD_RECORDS off there is nothing to join."""

    status, title, slug = 409, "Feedback needs prediction records", "feedback-needs-records"


class RecordsUnavailable(ServiceError):
    """The records database is not reachable (or not migrated yet): feedback cannot be stored now."""

    status, title, slug = 503, "Records database unavailable", "records-unavailable"
