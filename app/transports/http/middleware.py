"""Pure ASGI middleware for every HTTP request: the request id (the client's ``X-Request-ID`` when
it is sane, else a UUID), security headers, the body's limits, request duration by route template,
method and status, and the access log line.

The body is never read unbounded: a Content-Length over the limit is refused up front and streamed
bodies are counted (413); the bytes of all bodies held at once share a budget, taken as they arrive
(503 + Retry-After beyond); the whole body must arrive within ``BTD_BODY_TIMEOUT_S`` (408). A client that hangs up before its body
is read is counted and logged as its own fault (499, info), not as a server error."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import (
    BadRequest,
    ClientDisconnected,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
)
from app.engine import metrics
from app.settings import Settings
from app.transports.http.headers import security_headers
from app.transports.http.problems import (
    internal_error_response,
    log_service_error,
    problem_of,
    problem_response,
)

access_log = logging.getLogger("app.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
RETRY_AFTER_S = 1


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
    """The route template (``/v2/models/{model_name}/infer``) for the duration metric, the access log
    and the audit trail: never the path a client chose, which could carry anything (a patient's name
    in a model name); "unmatched" for unknown paths. A request refused before routing (by the guard,
    or 413 by Content-Length) is matched against the app's routes here, as the router would."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return template
    app = scope.get("app")
    if app is None:
        return "unmatched"
    routes = getattr(app.state, "route_patterns", None)
    if routes is None:
        routes = app.state.route_patterns = list(_leaf_routes(app.routes))
    path = scope["path"]
    return next((template for pattern, template in routes if pattern.match(path)), "unmatched")


def _leaf_routes(routes: Iterable[Any]) -> Iterator[tuple[re.Pattern[str], str]]:
    """(path regex, template) of each route, in routing order, looking into included routers (newer
    FastAPI keeps them nested); a router included with a prefix would only make its paths "unmatched"."""
    for route in routes:
        pattern, template = getattr(route, "path_regex", None), getattr(route, "path", None)
        if pattern is not None and template:
            yield pattern, template
        else:
            yield from _leaf_routes(getattr(getattr(route, "original_router", None), "routes", ()))


class UploadBudget:
    """Request-body bytes held in memory by all requests together (one event loop: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        metrics.UPLOAD_BYTES.set(self.held)
        return True

    def give_back(self, size: int) -> None:
        self.held -= size
        metrics.UPLOAD_BYTES.set(self.held)


class _Body:
    """One request's body as it arrives: its bytes counted against the size limit and the shared
    budget, and against the time it may take."""

    def __init__(self, receive: Receive, settings: Settings, budget: UploadBudget) -> None:
        self._receive = receive
        self.limit = settings.max_body_bytes
        self.budget = budget
        self.deadline = time.monotonic() + settings.body_timeout_s
        self.timeout_s = settings.body_timeout_s
        self.received = 0
        self.reserved = 0
        self.complete = False

    def _reserve(self, total: int) -> None:
        if total > self.reserved:
            if not self.budget.take(total - self.reserved):
                raise Overloaded("too many uploads in progress; retry shortly",
                                 headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
            self.reserved = total

    def release(self) -> None:
        self.budget.give_back(self.reserved)
        self.reserved = 0

    async def receive(self) -> Message:
        if self.complete:  # the body is in: later receives wait for a disconnect, untimed
            return await self._receive()
        # Budget is taken for the bytes that arrived, never for the Content-Length announced: clients
        # that announce 32 MiB and send nothing hold nothing (issue 21: eight of them refused every
        # real upload for BTD_BODY_TIMEOUT_S). Only a route reads the body, after the guard let it in.
        remaining = self.deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(self._receive(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s",
                                 headers={"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected before its request body was read")
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {self.limit} bytes",
                                      headers={"Connection": "close"})
            self._reserve(self.received)
            self.complete = not message.get("more_body", False)
        return message


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.uploads = UploadBudget(settings.max_upload_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started_response = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
                message["headers"] = security_headers(scope["path"], scope.get("scheme", "http"), headers)
            await send(message)

        async def refuse(error: ServiceError) -> None:
            log_service_error(error, request_id)
            response = problem_response(problem_of(error, scope["path"], request_id),
                                        {**error.headers, "Connection": "close"})
            await response(scope, receive, send_with_headers)

        body: _Body | None = None
        try:
            if _CONTROL.search(scope["path"]):
                await refuse(BadRequest("the path contains control characters"))
                return
            declared = content_length(scope["headers"])
            limit = self.settings.max_body_bytes
            if declared is not None and declared > limit:
                await refuse(PayloadTooLarge(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes"))
                return
            body = _Body(receive, self.settings, self.uploads)
            await self.app(scope, body.receive, send_with_headers)
        except ClientDisconnected as error:  # raised outside a route (e.g. by the multipart parser's caller)
            log_service_error(error, request_id)
            metrics.ERRORS.labels(error.slug).inc()
            status = error.status
        except Exception:
            if started_response:  # too late for a problem response: let the server close the connection
                raise
            await internal_error_response(scope["path"], request_id)(scope, receive, send_with_headers)
        finally:
            if body is not None:
                body.release()
            route = route_template(scope)
            method = metrics.method_label(scope["method"])
            elapsed = time.perf_counter() - started
            metrics.REQUEST_DURATION.labels(route, method, str(status)).observe(elapsed)
            client = (scope.get("client") or ("-",))[0]
            # No query string and no raw path: a client can put anything there, patient data included.
            access_log.info('%s "%s %s" %d %.1fms request_id=%s', client, method, route, status, elapsed * 1000,
                            request_id)
