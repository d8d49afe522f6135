"""The HTTP/1.1 server's own defences, below the ASGI app, and the uvicorn configuration.

uvicorn's h11 protocol, with what it lacks against hostile clients:

- **Request heads are bounded**: more than ``BTD_MAX_HEADER_BYTES`` of request line and headers, or
  more than ``BTD_MAX_HEADERS`` fields, is a 431 and the connection is closed (h11 stops buffering
  at the byte limit, so a 64 MB header never reaches memory).
- **Heads must arrive in time**: a connection that starts a request and does not finish its head
  within ``BTD_HEADER_TIMEOUT_S`` gets a 408 and is closed; one that sends nothing is closed after
  the same time (slowloris). Bodies have their own deadline in the request middleware.
- **Idle keep-alive connections** are closed after ``BTD_KEEP_ALIVE_TIMEOUT_S`` (uvicorn's own timer).
- **Open connections are capped** at ``BTD_MAX_CONNECTIONS``: one more gets a 503 problem with
  Retry-After and is closed before anything is read.

Every refusal here is problem+json like the app's, counted in ``btd_errors_total`` and logged once
per burst. ``server_config`` builds the uvicorn Config (TLS, proxy headers, no access log of its own:
the app writes one without query strings, no Server header).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.core.errors import HeadersTooLarge, Overloaded, RequestTimeout, ServiceError
from app.engine import metrics
from app.settings import Settings
from app.transports.http.problems import BURSTS, problem_body

log = logging.getLogger("app.http")
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(settings.max_header_bytes, settings.max_headers, settings.header_timeout_s,
                   settings.max_connections)


class TooManyConnections(Overloaded):
    title, slug = "Too many connections", "too-many-connections"


class InvalidHttp(ServiceError):
    status, title, slug = 400, "Bad request", "bad-request"


def problem_bytes(error: ServiceError, request_id: str, instance: str = "/") -> bytes:
    body = problem_body(error.status, error.slug, error.title, error.detail, instance, request_id)
    return json.dumps(body, separators=(",", ":")).encode()


def refused(error: ServiceError, client: Any) -> tuple[str, bytes]:
    """Count and log (once per burst) a refusal made below the app; its request id and body."""
    request_id = str(uuid.uuid4())
    metrics.ERRORS.labels(error.slug).inc()
    address = client[0] if client else "-"
    BURSTS.log(logging.INFO if error.status < 500 else logging.WARNING, error.slug, "%s %s from %s: %s "
               "(request_id=%s)", error.status, error.slug, address, error.detail, request_id)
    return request_id, problem_bytes(error, request_id)


class GuardedH11Protocol(H11Protocol):
    """One connection. ``limits`` is set on the subclass ``protocol_class`` makes."""

    limits: ClassVar[HttpLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: Any = None
        self._head_started = False
        self._refusal: ServiceError | None = None
        next_event = self.conn.next_event

        # uvicorn's event loop drops h11's reason for refusing a request (its error_status_hint: 431
        # for an oversized head) and answers a plain-text 400: the reason is kept here, where events
        # come from, so send_400_response can answer with the right status, as problem+json.
        def guarded_next_event() -> Any:
            try:
                event = next_event()
            except h11.RemoteProtocolError as exc:
                self._refusal = self._refusal_for(exc)
                raise
            if isinstance(event, h11.Request):
                self._cancel_head_timer()
                self._head_started = False
                self._refusal = self._head_refusal(event)
                if self._refusal is not None:
                    raise h11.RemoteProtocolError(self._refusal.detail, error_status_hint=431)
            return event

        self.conn.next_event = guarded_next_event  # type: ignore[method-assign]

    def _head_refusal(self, request: h11.Request) -> ServiceError | None:
        """h11 bounds a head only while it is incomplete: one that arrived whole is measured here."""
        if len(request.headers) > self.limits.max_headers:
            return HeadersTooLarge(f"more than {self.limits.max_headers} header fields")
        size = len(request.method) + len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
        if size > self.limits.max_header_bytes:
            return HeadersTooLarge(f"the request line and headers exceed {self.limits.max_header_bytes} bytes")
        return None

    def _refusal_for(self, exc: h11.RemoteProtocolError) -> ServiceError:
        if exc.error_status_hint == 431:
            return HeadersTooLarge(f"the request line and headers exceed {self.limits.max_header_bytes} bytes")
        return InvalidHttp("the request is not valid HTTP/1.1")

    # -- connections ------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            error = TooManyConnections(f"more than {self.limits.max_connections} open connections; retry shortly")
            request_id, body = refused(error, transport.get_extra_info("peername"))
            head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
                    f"content-length: {len(body)}\r\nretry-after: {RETRY_AFTER_S}\r\nx-request-id: {request_id}\r\n"
                    "connection: close\r\n\r\n")
            transport.write(head.encode("latin-1") + body)
            transport.close()
            return
        super().connection_made(transport)
        metrics.OPEN_CONNECTIONS.set(len(self.connections))
        self._arm_head_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
        metrics.OPEN_CONNECTIONS.set(len(self.connections))

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # these bytes begin (or continue) a request head
            self._head_started = True
            self._arm_head_timer()
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.trailing_data[0]:  # a pipelined head waits
            self._head_started = True
            self._arm_head_timer()

    # -- the request head's deadline --------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if not self._head_started:  # opened and never used: close quietly, like an idle keep-alive
            self.transport.close()
            return
        self._refusal = RequestTimeout(f"the request head did not arrive within {self.limits.header_timeout_s:g} s")
        self.send_400_response("")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot take: here the status h11 (or a limit) gives,
        with a problem+json body, and the connection closed."""
        error = self._refusal or InvalidHttp("the request is not valid HTTP/1.1")
        self._refusal = None
        self._cancel_head_timer()
        request_id, body = refused(error, self.client)
        headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"x-request-id", request_id.encode())]
        reason = HTTPStatus(error.status).phrase.encode()
        try:
            for event in (h11.Response(status_code=error.status, headers=headers, reason=reason), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 cannot frame a response now (e.g. a half-sent one): just close
            pass
        self.transport.close()


def protocol_class(limits: HttpLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class _DropUvicornRefusalLine(logging.Filter):
    """uvicorn logs a bare "Invalid HTTP request received." before each refusal; the protocol above
    logs its own line (status, reason, request id, once per burst) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, workers=1, log_level=settings.log_level, lifespan="on",
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        http=protocol_class(HttpLimits.from_settings(settings)),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        access_log=False,  # RequestContextMiddleware writes it, without query strings
        server_header=False,
        proxy_headers=True, forwarded_allow_ips=settings.forwarded_allow_ips,
        ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile,
    )
    logging.getLogger("uvicorn.error").addFilter(_DropUvicornRefusalLine())  # after Config set logging up
    return config
