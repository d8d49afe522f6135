"""Every error response, rendered as RFC 9457 ``application/problem+json`` in one place:
typed service errors, FastAPI validation errors, Starlette HTTP errors (404, 405...) and any
unexpected exception (500 with a body that hides internals; the log keeps them with the request id)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import metrics
from app.errors import ServiceError

log = logging.getLogger("app.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
_HTTP_SLUGS = {400: ("bad-request", "Bad request"), 404: ("not-found", "Not found"), 405: ("method-not-allowed", "Method not allowed")}


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or ""


V2_PREFIX = "/v2"  # Open Inference Protocol clients read the message from an "error" member


def problem_body(status: int, slug: str, title: str, detail: str, instance: str, request_id: str,
                 **extra) -> dict:
    if instance == V2_PREFIX or instance.startswith(V2_PREFIX + "/"):
        extra.setdefault("error", detail)
    return {"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail,
            "instance": instance, "request_id": request_id, **extra}


def problem_of(error: ServiceError, instance: str, request_id: str) -> dict:
    return problem_body(error.status, error.slug, error.title, error.detail, instance, request_id)


def problem_response(body: dict, headers: dict[str, str] | None = None, *, is_error: bool = True) -> JSONResponse:
    """The problem+json response, counted in ``btd_errors_total`` unless it reports a state, not an
    error (a health probe's 503 while loading)."""
    if is_error:
        metrics.ERRORS.labels(body["type"].rsplit("/", 1)[-1]).inc()
    return JSONResponse(body, status_code=body["status"], headers=headers, media_type=PROBLEM_MEDIA_TYPE)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.status >= 500:  # overload, timeouts, not ready: worth a line for whoever runs the service
        log.warning("%s %s: %s (request_id=%s)", exc.status, exc.slug, exc.detail, request_id_of(request))
    return problem_response(problem_of(exc, request.url.path, request_id_of(request)), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Only where and what, never the rejected input (it could be anything the client sent).
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
    body = problem_body(422, "validation-error", "Validation error", detail, request.url.path,
                        request_id_of(request), errors=errors)
    return problem_response(body)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
    detail = exc.detail if isinstance(exc.detail, str) else title
    body = problem_body(exc.status_code, slug, title, detail, request.url.path, request_id_of(request))
    return problem_response(body, dict(exc.headers or {}))


def internal_error_response(instance: str, request_id: str) -> JSONResponse:
    """A 500 that hides internals; the caller logs the exception with the request id."""
    log.exception("unhandled error (request_id=%s)", request_id)
    body = problem_body(500, "internal-error", "Internal error", "an unexpected error occurred; quote the request id",
                        instance, request_id)
    return problem_response(body)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Normally RequestContextMiddleware answers first (with the X-Request-ID header); this is the backstop.
    return internal_error_response(request.url.path, request_id_of(request))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
