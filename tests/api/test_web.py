"""The web routes (app/transports/http/web.py): the page and /docs come from local files only, outside the API schema."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.transports.http.web import STATIC_DIR
from tests.api.helpers import assert_problem

# src="//cdn...", href="https://...", url(https://...), fetch("https://...")
EXTERNAL_URL = re.compile(
    r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|\burl\(\s*["']?(?:https?:)?//|fetch\(\s*["'`]https?:"""
)


def test_index_page_is_served_with_a_strict_content_security_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "Decision support, not a diagnosis" in response.text


def test_static_assets_refer_to_nothing_off_site() -> None:
    for asset in sorted(STATIC_DIR.rglob("*")):
        if asset.suffix in (".html", ".js", ".css"):
            assert not EXTERNAL_URL.search(asset.read_text()), f"{asset.name} loads something off-site"


def test_static_asset_is_served_and_a_path_outside_the_folder_is_not_found(client: TestClient) -> None:
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    for probe in ("/static/..%2Fweb.py", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/missing.js"):
        assert_problem(client.get(probe), 404, "not-found")


def test_docs_page_loads_swagger_ui_from_this_server(client: TestClient) -> None:
    html = client.get("/docs").text
    scripts = re.findall(r'<script src="([^"]+)"', html)
    styles = re.findall(r'<link[^>]+href="([^"]+)"', html)
    assert scripts == ["/docs/assets/swagger-ui-bundle.js", "/static/docs.js"]
    assert "/docs/assets/swagger-ui.css" in styles
    for url in scripts + styles:
        response = client.get(url)
        assert response.status_code == 200 and response.content, url
    assert 'data-openapi-url="/openapi.json"' in html
    assert "<script>" not in html  # no inline code: the docs' CSP admits scripts from this origin only


def test_web_routes_stay_out_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith(("/docs", "/static"))]


def test_favicon_is_served_so_a_page_load_logs_no_404(client: TestClient) -> None:
    for path in ("/favicon.ico", "/static/favicon.svg"):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
        assert response.content.startswith(b"<svg")
    assert 'rel="icon"' in client.get("/").text


def test_page_knows_the_not_assessed_phrases_and_every_reason() -> None:
    import typing

    from app.core.result import GATE_PHRASE, OOD_PHRASE, OodReason

    script = (STATIC_DIR / "app.js").read_text()
    assert f'const OOD_PHRASE = "{OOD_PHRASE}";' in script and f'const GATE_PHRASE = "{GATE_PHRASE}";' in script
    texts = script[script.index("const OOD_REASON_TEXT = {"):]
    texts = texts[:texts.index("};")]
    for reason in typing.get_args(OodReason):
        assert re.search(rf'(^|\s)"?{re.escape(reason)}"?:', texts, re.MULTILINE), f"no plain words for {reason}"


def test_monitoring_page_is_served_from_this_server_and_names_every_drift_signal(client: TestClient) -> None:
    from app.core.baseline import SIGNALS

    response = client.get("/monitoring")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert re.findall(r'<script src="([^"]+)"', response.text) == ["static/monitoring.js"]
    assert "<script>" not in response.text and "style=" not in response.text  # the CSP admits neither
    script = client.get("/static/monitoring.js").text
    assert 'const API_MONITORING = "v1/monitoring";' in script
    names = re.search(r"const SIGNAL_NAMES = \{(.*?)\};", script, re.DOTALL).group(1)
    assert set(re.findall(r"^\s*(\w+):", names, re.MULTILINE)) == set(SIGNALS)
