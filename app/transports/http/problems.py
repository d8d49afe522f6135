"""Every error response, rendered as RFC 9457 ``application/problem+json`` in one place:
typed service errors, FastAPI validation errors, Starlette HTTP errors (404, 405...) and any
unexpected exception (500 with a body that hides internals; the log keeps them with the request id)."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import ClientDisconnected, ServiceError
from app.engine import metrics

log = logging.getLogger("app.transports.http")
BURST_INTERVAL_S = 10.0


class BurstLog:
    """At most one line per ``interval_s`` for each kind of event (a bounded set of keys, e.g. problem
    types): under overload a burst of 503s is one line, and the next line says how many it folded in.
    The metrics count every one."""

    def __init__(self, logger: logging.Logger, interval_s: float = BURST_INTERVAL_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> bool:
        """Log unless a line for ``key`` was written less than ``interval_s`` ago; True if written."""
        now = time.monotonic()
        last, folded = self._last.get(key, (None, 0))
        if last is not None and now - last < self.interval_s:
            self._last[key] = (last, folded + 1)
            return False
        if folded:
            message, args = message + " (and %d more since the last such line)", (*args, folded)
        self._last[key] = (now, 0)
        self.logger.log(level, message, *args)
        return True


BURSTS = BurstLog(log)

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


def log_service_error(error: ServiceError, request_id: str) -> None:
    """Overload, timeouts, not ready: worth a line for whoever runs the service (one per burst). A
    client hanging up is the client's business: info."""
    if error.status >= 500:
        BURSTS.log(logging.WARNING, error.slug, "%s %s: %s (request_id=%s)", error.status, error.slug, error.detail,
                   request_id)
    elif isinstance(error, ClientDisconnected):
        BURSTS.log(logging.INFO, error.slug, "client disconnected before its request was read (request_id=%s)",
                   request_id)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    log_service_error(exc, request_id_of(request))
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
