"""Pure ASGI middleware for every HTTP request: the request id (the client's ``X-Request-ID`` when
it is sane, else a UUID), the body size limit (Content-Length refused up front, streamed bodies
counted: never read unbounded), request duration by route template and status, in-flight count."""

from __future__ import annotations

import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.problems import internal_error_response, problem_of, problem_response
from app.errors import PayloadTooLarge

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNTRACKED_PATHS = ("/metrics", "/livez", "/readyz", "/v2/health/live", "/v2/health/ready")  # not in-flight work


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _REQUEST_ID.match(text):
                return text
    return str(uuid.uuid4())


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def route_template(scope: Scope) -> str:
    """The route template for the duration metric; "unmatched" for unknown paths. A request refused
    before routing (413 by Content-Length) is an API path, which is its own template (none has
    parameters), so its 413 is counted under that route too."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return template
    app = scope.get("app")
    api_paths = app.openapi().get("paths", {}) if hasattr(app, "openapi") else {}
    return scope["path"] if scope["path"] in api_paths else "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started_response = False
        limit = self.max_body_bytes

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            return message

        tracked = scope["path"] not in UNTRACKED_PATHS
        if tracked:
            metrics.IN_FLIGHT.inc()
        try:
            declared = content_length(scope["headers"])
            if declared is not None and declared > limit:
                error = PayloadTooLarge(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes")
                response = problem_response(problem_of(error, scope["path"], request_id), {"Connection": "close"})
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, counted_receive, send_with_id)
        except Exception:
            if started_response:  # too late for a problem response: let the server close the connection
                raise
            await internal_error_response(scope["path"], request_id)(scope, receive, send_with_id)
        finally:
            if tracked:
                metrics.IN_FLIGHT.dec()
            metrics.REQUEST_DURATION.labels(route_template(scope), scope["method"], str(status)).observe(
                time.perf_counter() - started)

