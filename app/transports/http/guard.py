"""Who may ask: a pure ASGI middleware in front of the routes, refusing with problem+json.

1. **Host** (``BTD_ALLOWED_HOSTS``): a name this server is not is refused (400), which stops DNS
   rebinding (a page on attacker.example whose name now resolves to 127.0.0.1). An IP address
   is always served: rebinding needs a name, and probes and scrapers call pods by address.
2. **Cross-site browser requests**: a POST (or any unsafe method) that a browser marks as coming
   from another site (``Sec-Fetch-Site``, else ``Origin``'s scheme, host and port against the
   request's own: its scheme and ``Host``) is refused (403) unless its origin is in
   ``BTD_ALLOWED_ORIGINS``. Clients that are not browsers send neither header.
3. **API keys** (``BTD_API_KEYS_FILE`` / ``BTD_API_KEYS``): ``/v1/*`` and ``/v2/models/*`` need a
   key with the ``predict`` scope, but readers' feedback (``/v1/feedback``) one with the ``feedback`` scope; ``/metrics`` (``BTD_AUTH_METRICS``) and ``/docs``, ``/openapi.json``
   (``BTD_AUTH_DOCS``) when configured; probes and the page's static files never. The key comes in
   ``X-API-Key``, ``Authorization: Bearer`` or as the password of ``Authorization: Basic`` (so a
   browser can open a protected /docs). Missing or unknown: 401; known without the scope: 403.
   Requests without a valid key are limited per client address (``BTD_AUTH_FAILURES_PER_MINUTE``,
   a token bucket): beyond, 429 + Retry-After instead of 401, while a valid key from the same
   address is still served (an attacker sharing it cannot lock a real client out). Each 401 and
   403 is an ``access-denied`` audit line; a throttled client's refusals fold into one
   ``access-throttled`` line per client a minute, with their ``count`` (2,000 wrong keys were 2,000
   lines: a disk-filling rate).
4. **Rate limit** (``BTD_RATE_LIMIT_PER_MINUTE``): predictions per client (key name, else address),
   a token bucket; beyond: 429 + Retry-After.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import CrossSiteRequest, Forbidden, InvalidHost, RateLimited, ServiceError, Unauthorized
from app.engine import metrics
from app.settings import Settings
from app.transports.http.api_keys import KeyStore
from app.transports.http.audit import AuditLog
from app.transports.http.middleware import route_template
from app.transports.http.problems import log_service_error, problem_of, problem_response

OPEN_PATHS = ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready")
# The model and its answers (the Open Inference Protocol's too); /v2's server metadata stays open.
PREDICT_SCOPE_PREFIXES = ("/v1/", "/v2/models/")
FEEDBACK_PATH = "/v1/feedback"  # its own scope: a reader's key need not classify, a PACS router's need not judge


def is_probe(path: str) -> bool:
    """Health endpoints: open whatever the keys (a model's readiness under /v2/models too)."""
    return path in OPEN_PATHS or (path.startswith("/v2/models/") and path.endswith("/ready"))


def is_prediction(path: str) -> bool:
    return path.startswith("/v1/predict") or (path.startswith("/v2/models/") and path.endswith("/infer"))
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_RATE_CLIENTS = 10_000  # buckets kept (least recently used dropped): memory stays bounded


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(host: str) -> str:
    """The name part of a Host header value: no port, IPv6 brackets removed, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    if host is None:  # HTTP/1.0 without Host: nothing to rebind
        return True
    name = host_name(host)
    if is_ip_address(name) or "*" in allowed:
        return True
    return any(name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])) for pattern in allowed)


def cross_site(scope: Scope, allowed_origins: tuple[str, ...]) -> bool:
    """True for a browser request from another origin that BTD_ALLOWED_ORIGINS does not admit."""
    origin = header(scope, b"origin")
    if origin is not None and origin.rstrip("/").lower() in allowed_origins:
        return False
    fetch_site = header(scope, b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.lower() not in ("same-origin", "none")
    if origin is None:  # not a browser (or a very old one): nothing to judge by
        return False
    if origin == "null":  # sandboxed frames, file: pages, redirects across origins
        return True
    own = origin_of(f"{scope.get('scheme', 'http')}://{header(scope, b'host') or ''}")
    return own is None or origin_of(origin) != own


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_of(url: str) -> tuple[str, str, int | None] | None:
    """A web origin's (scheme, host, port), the port made explicit; None for anything else (a path,
    credentials, no host, a bad port)."""
    if any(c in url.split("://", 1)[-1] for c in "/?#@\\"):
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS.get(scheme)


def presented_key(scope: Scope) -> str | None:
    key = header(scope, b"x-api-key")
    if key:
        return key.strip()
    authorization = header(scope, b"authorization") or ""
    kind, _, credentials = authorization.partition(" ")
    if kind.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if kind.lower() == "basic":
        try:
            _, _, password = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    return None


class TokenBuckets:
    """A token bucket per client: ``burst`` at once, refilled at ``per_minute``."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """0 if ``client`` may go now, else the seconds until it may."""
        now = time.monotonic()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1 if tokens >= 1 else tokens, now)
        while len(self._buckets) > MAX_RATE_CLIENTS:
            self._buckets.popitem(last=False)
        return wait


class AuthThrottled(RateLimited):
    """Too many requests without a valid key from one address (the same 429 problem as the rate limit)."""


THROTTLED_LINE_S = 60.0  # one access-throttled audit line per client per minute


class FoldedCounts:
    """Events per client folded into one line per ``interval_s``: ``add`` returns how many events the
    line to write now stands for (this one and those folded since the last line), or 0: no line."""

    def __init__(self, interval_s: float = THROTTLED_LINE_S) -> None:
        self.interval_s = interval_s
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def add(self, client: str) -> int:
        now = time.monotonic()
        last, folded = self._last.pop(client, (None, 0))
        if last is not None and now - last < self.interval_s:
            self._last[client] = (last, folded + 1)
            return 0
        self._last[client] = (now, 0)
        while len(self._last) > MAX_RATE_CLIENTS:
            self._last.popitem(last=False)
        return folded + 1


def client_address(scope: Scope) -> str:
    return (scope.get("client") or ("-",))[0]


class GuardMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, keys: KeyStore | None, audit: AuditLog) -> None:
        self.app = app
        self.settings = settings
        self.keys = keys
        self.audit = audit
        self.buckets = (TokenBuckets(settings.rate_limit_per_minute, settings.rate_limit_burst)
                        if settings.rate_limit_per_minute else None)
        self.failures = (TokenBuckets(settings.auth_failures_per_minute, settings.auth_failures_burst)
                         if settings.auth_failures_per_minute and keys is not None else None)
        self.throttled = FoldedCounts()

    def required_scope(self, path: str) -> str | None:
        if path == FEEDBACK_PATH or path.startswith(FEEDBACK_PATH + "/"):
            return "feedback"
        if path.startswith(PREDICT_SCOPE_PREFIXES):
            return "predict"
        if path == "/metrics" and self.settings.auth_metrics:
            return "metrics"
        if (path == "/openapi.json" or path == "/docs" or path.startswith("/docs/")) and self.settings.auth_docs:
            return "docs"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self.check(scope)
        except ServiceError as error:
            request_id = scope["state"].get("request_id", "")
            log_service_error(error, request_id)
            fields = {"request_id": request_id, "key": scope["state"].get("api_key"),
                      "client": (scope.get("client") or (None,))[0], "route": route_template(scope),
                      "method": metrics.method_label(scope["method"]), "status": error.status, "problem": error.slug}
            if isinstance(error, (Unauthorized, Forbidden)):
                self.audit.write("access-denied", **fields)
            elif isinstance(error, AuthThrottled) and (count := self.throttled.add(client_address(scope))):
                self.audit.write("access-throttled", **fields, count=count)
            response = problem_response(problem_of(error, scope["path"], request_id), error.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> None:
        """Raises the typed error the request is refused with; records the key's name in the scope."""
        path, state = scope["path"], scope.setdefault("state", {})
        if not host_allowed(header(scope, b"host"), self.settings.host_names):
            raise InvalidHost("this server does not answer to that Host name (BTD_ALLOWED_HOSTS)")
        if scope["method"] not in SAFE_METHODS and cross_site(scope, self.settings.origins):
            raise CrossSiteRequest("a browser request from another site was refused; the service's own page "
                                   "and non-browser clients may post (BTD_ALLOWED_ORIGINS admits other sites)")
        scope_needed = self.required_scope(path) if self.keys is not None and not is_probe(path) else None
        if scope_needed is not None:
            presented = presented_key(scope)
            key = self.keys.verify(presented) if presented else None
            if key is None:
                self._count_failure(scope)
                challenge = 'Bearer realm="btd"' if scope_needed == "predict" else 'Basic realm="btd", charset="UTF-8"'
                raise Unauthorized("an API key is required: send it in the X-API-Key header"
                                   if presented is None else "the API key is not valid",
                                   headers={"WWW-Authenticate": challenge})
            state["api_key"] = key.name
            if scope_needed not in key.scopes:
                raise Forbidden(f"the API key {key.name!r} does not have the {scope_needed!r} scope")
        if self.buckets is not None and is_prediction(path):
            client = state.get("api_key") or client_address(scope)
            wait = self.buckets.take(client)
            if wait > 0:
                raise RateLimited(f"more than {self.settings.rate_limit_per_minute} prediction requests a minute "
                                  "from this client", headers={"Retry-After": str(math.ceil(wait))})

    def _count_failure(self, scope: Scope) -> None:
        """A request without a valid key: 429 instead of 401 once its address has sent too many."""
        if self.failures is None:
            return
        wait = self.failures.take(client_address(scope))
        if wait > 0:
            raise AuthThrottled(f"more than {self.settings.auth_failures_per_minute} requests a minute without a "
                                "valid API key from this address", headers={"Retry-After": str(math.ceil(wait))})
