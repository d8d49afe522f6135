"""Security headers, on every response in one place (``RequestContextMiddleware`` adds them).

HTML gets a Content-Security-Policy that admits only this origin: the page's (no inline code at
all) or the API docs' (Swagger UI styles elements inline). Everything else, JSON included, gets
``default-src 'none'``, so a response opened as a document can run nothing. Prediction responses
(derived from patient images) are never stored by caches; HTTPS responses carry HSTS.
"""

from __future__ import annotations

PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
NONE_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_PREFIX = "/docs"
NO_STORE_PREFIXES = ("/v1/", "/v2/models/")  # predictions, derived from patient images
HSTS = "max-age=31536000"

_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), interest-cohort=()"),
)


def content_security_policy(path: str, content_type: str) -> str:
    if not content_type.startswith("text/html"):
        return NONE_CSP
    return DOCS_CSP if path == DOCS_PREFIX or path.startswith(DOCS_PREFIX + "/") else PAGE_CSP


def security_headers(path: str, scheme: str, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` of a response to ``path`` plus the security headers it lacks."""
    present = {name.lower() for name, _ in headers}
    content_type = next((v.decode("latin-1") for n, v in headers if n.lower() == b"content-type"), "").lower()
    extra = [(name, value) for name, value in _ALWAYS if name not in present]
    if b"content-security-policy" not in present:
        extra.append((b"content-security-policy", content_security_policy(path, content_type).encode()))
    if path.startswith(NO_STORE_PREFIXES):
        extra = [*extra, (b"cache-control", b"no-store")]
        headers = [(n, v) for n, v in headers if n.lower() != b"cache-control"]
    if scheme == "https" and b"strict-transport-security" not in present:
        extra.append((b"strict-transport-security", HSTS.encode()))
    return [*headers, *extra]
