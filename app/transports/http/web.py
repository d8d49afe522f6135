"""The clinician web page (``/``), the monitoring page (``/monitoring``) and the API docs (``/docs``),
all served from local files.

Nothing is fetched from a CDN: the page is plain HTML/JS/CSS under ``app/transports/http/static/`` and Swagger UI's
assets come from the ``swagger-ui-bundle-v2`` package; Swagger UI is started by a script file, not
inline code, so the docs' Content-Security-Policy admits scripts from this origin only. Security
headers (CSP and the rest) are added to every response in one place, ``app.transports.http.headers``.
None of these routes is in the OpenAPI schema. The app factory must create FastAPI with
``docs_url=None, redoc_url=None`` so that ``/docs`` is this one.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/static"
DOCS_ASSETS_PREFIX = "/docs/assets"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag) so a new release's page is picked up

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title}</title>
  <link rel="stylesheet" href="{assets}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
  <script src="{assets}/swagger-ui-bundle.js"></script>
  <script src="{static}/docs.js"></script>
</body>
</html>
"""

router = APIRouter(include_in_schema=False)


def swagger_ui_dir() -> Path:
    """Where the installed Swagger UI distribution lies (imported lazily: only /docs needs it)."""
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def file_under(root: Path, name: str) -> Path:
    """``root / name`` if it is a file inside ``root``; 404 otherwise (no path traversal, and a name
    the file system cannot even look up, e.g. with a NUL byte, is simply not there)."""
    root = root.resolve()
    try:
        path = (root / name).resolve()
        found = path.is_relative_to(root) and path.is_file()
    except (ValueError, OSError):
        found = False
    if not found:
        raise HTTPException(status_code=404, detail="no such file")
    return path


@router.get("/")
def index_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=NO_CACHE)


@router.get("/monitoring")
def monitoring_page() -> FileResponse:
    """Drift over time and live performance (reliability diagram, confusion matrix) from ``GET /v1/monitoring``,
    drawn in the browser."""
    return FileResponse(STATIC_DIR / "monitoring.html", media_type="text/html; charset=utf-8", headers=NO_CACHE)


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    """Browsers ask for it on every page load (and /docs pages link it): the page's SVG icon."""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers=NO_CACHE)


@router.get(STATIC_PREFIX + "/{name:path}")
def static_file(name: str) -> FileResponse:
    return FileResponse(file_under(STATIC_DIR, name), headers=NO_CACHE)


@router.get("/docs")
def api_docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return HTMLResponse(DOCS_PAGE.format(
        title=escape(f"{request.app.title} - API docs"), assets=escape(root + DOCS_ASSETS_PREFIX),
        static=escape(root + STATIC_PREFIX), openapi_url=escape(root + (request.app.openapi_url or "/openapi.json"))))


@router.get(DOCS_ASSETS_PREFIX + "/{name:path}")
def api_docs_asset(name: str) -> FileResponse:
    return FileResponse(file_under(swagger_ui_dir(), name))
