"""The clinician web page (``/``) and the API docs (``/docs``), both served from local files.

Nothing is fetched from a CDN: the page is plain HTML/JS/CSS under ``app/static/`` and Swagger UI's
assets come from the ``swagger-ui-bundle-v2`` package. None of these routes is in the OpenAPI schema.
The app factory must create FastAPI with ``docs_url=None, redoc_url=None`` so that ``/docs`` is this one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/static"
DOCS_ASSETS_PREFIX = "/docs/assets"

# The page talks only to its own origin and loads nothing from elsewhere; JS sets sizes through CSSOM.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag) so a new release's page is picked up

router = APIRouter(include_in_schema=False)


def swagger_ui_dir() -> Path:
    """Where the installed Swagger UI distribution lies (imported lazily: only /docs needs it)."""
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def file_under(root: Path, name: str) -> Path:
    """``root / name`` if it is a file inside ``root``; 404 otherwise (no path traversal)."""
    root = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(status_code=404, detail=f"no such file: {name}")
    return path


@router.get("/")
def index_page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**NO_CACHE, "Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"},
    )


@router.get(STATIC_PREFIX + "/{name:path}")
def static_file(name: str) -> FileResponse:
    headers = {**NO_CACHE, "X-Content-Type-Options": "nosniff"}
    return FileResponse(file_under(STATIC_DIR, name), headers=headers)


@router.get("/docs")
def api_docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    assets = root + DOCS_ASSETS_PREFIX
    return get_swagger_ui_html(
        openapi_url=root + (request.app.openapi_url or "/openapi.json"),
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon-32x32.png",
    )


@router.get(DOCS_ASSETS_PREFIX + "/{name:path}")
def api_docs_asset(name: str) -> FileResponse:
    return FileResponse(file_under(swagger_ui_dir(), name))
