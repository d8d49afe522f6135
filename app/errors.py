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


class InvalidRequest(ServiceError):
    """The request is well-formed HTTP but not what the operation expects (e.g. no ``file`` field)."""

    status, title, slug = 422, "Validation error", "validation-error"


class NotAcceptable(ServiceError):
    """The client asked for a representation this input cannot have (DICOM results of a PNG)."""

    status, title, slug = 406, "Not acceptable", "not-acceptable"


class ModelNotFound(ServiceError):
    """An Open Inference Protocol path names a model (or version) this server does not serve."""

    status, title, slug = 404, "Model not found", "model-not-found"


class InvalidTensor(ServiceError):
    """An Open Inference Protocol request whose tensors do not fit the model (name, type, shape, data)."""

    status, title, slug = 400, "Invalid tensor", "invalid-tensor"
