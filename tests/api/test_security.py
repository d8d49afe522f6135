"""Browser hardening, API keys, rate limits, the audit trail and the request middleware's defences,
in process (the HTTP server's own limits are attacked for real in tests/e2e/test_hostile_server.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.engine import metrics
from app.settings import Settings
from app.transports.http.api_keys import KeyFileError, KeyStore, key_line, new_key, parse_keys
from app.transports.http.headers import DOCS_CSP, NONE_CSP, PAGE_CSP
from app.transports.http.main import create_app
from app.transports.http.problems import BurstLog
from tests.api.helpers import assert_problem, png_bytes, running_app

REPO = Path(__file__).resolve().parents[2]
PNG = {"Content-Type": "image/png"}


def counter(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- security headers -------------------------------------------------------------------------------


@pytest.mark.parametrize("path,csp", [("/", PAGE_CSP), ("/static/index.html", PAGE_CSP), ("/docs", DOCS_CSP),
                                      ("/openapi.json", NONE_CSP), ("/v1/model", NONE_CSP), ("/livez", NONE_CSP),
                                      ("/nowhere", NONE_CSP)])
def test_every_response_carries_the_security_headers(client, path, csp):
    response = client.get(path)
    assert response.headers["content-security-policy"] == csp, path
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in csp
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "strict-transport-security" not in response.headers  # plain HTTP here


def test_prediction_responses_are_never_cached(client):
    response = client.post("/v1/predict", content=png_bytes(), headers=PNG)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    assert client.get("/static/app.js").headers["cache-control"] == "no-cache"  # revalidated, may be cached


def test_https_responses_carry_hsts(client):
    response = client.get("https://testserver/livez")
    assert response.headers["strict-transport-security"].startswith("max-age=")


# --- hosts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host,allowed", [("testserver", True), ("TestServer:8000", True), ("127.0.0.1:8000", True),
                                          ("[::1]:8000", True), ("10.1.2.3", True), ("evil.example", False),
                                          ("testserver.evil.example", False), ("localhost", False)])
def test_host_header_must_be_allowed_or_an_address(client, host, allowed):
    response = client.get("/livez", headers={"Host": host})
    if allowed:
        assert response.status_code == 200
    else:
        assert_problem(response, 400, "invalid-host")


def test_allowed_hosts_default_to_local_names_and_take_wildcards(model_path):
    assert Settings().host_names == ("localhost", "127.0.0.1", "::1")
    with running_app(model_path, allowed_hosts="testserver,*.hospital.example") as client:
        assert client.get("/livez", headers={"Host": "btd.radiology.hospital.example"}).status_code == 200
        assert client.get("/livez", headers={"Host": "hospital.example.evil"}).status_code == 400


# --- cross-site requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("headers,refused", [
    ({}, False),  # curl, PACS engines: no browser headers at all
    ({"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"}, False),
    ({"Sec-Fetch-Site": "none"}, False),  # typed by the user
    ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, True),
    ({"Sec-Fetch-Site": "same-site", "Origin": "http://other.testserver"}, True),
    ({"Origin": "https://evil.example"}, True),  # an older browser: judged by Origin against Host
    ({"Origin": "http://testserver"}, False),
    ({"Origin": "null"}, True),
    ({"Origin": "http://testserver:8080"}, True),  # same host, another port: another origin
    ({"Origin": "https://testserver"}, True),  # same host, another scheme
    ({"Origin": "http://testserver:80"}, False),  # the default port, spelt out
])
def test_cross_site_browser_posts_are_refused(client, headers, refused):
    response = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")}, headers=headers)
    if refused:
        assert_problem(response, 403, "cross-site-request")
    else:
        assert response.status_code == 200


def test_cross_site_gets_are_not_refused(client):
    assert client.get("/v1/model", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_allowed_origin_may_post_with_cors(model_path):
    origin = "https://viewer.hospital.example"
    with running_app(model_path, allowed_origins=origin + "/") as client:
        headers = {"Origin": origin, "Sec-Fetch-Site": "cross-site"}
        response = client.post("/v1/predict", content=png_bytes(), headers={**PNG, **headers})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin
        preflight = client.options("/v1/predict", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "x-api-key"})
        assert preflight.status_code == 200 and "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        other = client.post("/v1/predict", content=png_bytes(), headers={**PNG, "Origin": "https://evil.example",
                                                                          "Sec-Fetch-Site": "cross-site"})
        assert_problem(other, 403, "cross-site-request")


# --- API keys ---------------------------------------------------------------------------------------

KEY, READ_ONLY_METRICS_KEY = new_key(), new_key()
KEYS = "\n".join(["# test keys", key_line("pacs", KEY, ("predict", "docs")),
                  key_line("prometheus", READ_ONLY_METRICS_KEY, ("metrics",))])


@pytest.fixture(scope="module")
def keyed(model_path):
    # Many tests here send no key or a wrong one from the same client: their 401s are not throttled
    # (test_requests_without_a_valid_key_are_throttled_per_address covers that).
    with running_app(model_path, api_keys=KEYS, auth_metrics=True, auth_docs=True,
                     auth_failures_per_minute=0) as client:
        yield client


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()


@pytest.mark.parametrize("headers", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"},
                                     {"Authorization": basic(KEY)}])
def test_api_key_admits_in_any_of_its_forms(keyed, headers):
    assert keyed.get("/v1/model", headers=headers).status_code == 200
    response = keyed.post("/v1/predict", content=png_bytes(), headers={**PNG, **headers})
    assert response.status_code == 200


@pytest.mark.parametrize("headers,detail", [({}, "required"), ({"X-API-Key": "btd_wrong"}, "not valid"),
                                            ({"Authorization": "Bearer "}, "required"),
                                            ({"Authorization": "Basic !!!"}, "required")])
def test_missing_or_unknown_key_is_401_problem_with_a_challenge(keyed, headers, detail):
    for response in (keyed.get("/v1/model", headers=headers),
                     keyed.post("/v1/predict", content=png_bytes(), headers={**PNG, **headers}),
                     keyed.post("/v1/predict/batch", files=[("files", ("a.png", png_bytes()))], headers=headers)):
        body = assert_problem(response, 401, "unauthorized")
        assert detail in body["detail"] and response.headers["www-authenticate"].startswith("Bearer")
        assert KEY not in response.text


def test_key_without_the_scope_is_403(keyed):
    body = assert_problem(keyed.get("/v1/model", headers={"X-API-Key": READ_ONLY_METRICS_KEY}), 403, "forbidden")
    assert "prometheus" in body["detail"] and "predict" in body["detail"]
    assert keyed.get("/metrics", headers={"X-API-Key": READ_ONLY_METRICS_KEY}).status_code == 200
    assert_problem(keyed.get("/metrics", headers={"X-API-Key": KEY}), 403, "forbidden")


def test_probes_and_the_page_stay_open_while_metrics_and_docs_are_protected_by_setting(keyed, model_path):
    for path in ("/livez", "/readyz", "/", "/static/app.js"):
        assert keyed.get(path).status_code == 200, path
    for path in ("/metrics", "/docs", "/openapi.json", "/docs/assets/swagger-ui.css"):
        response = keyed.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Basic")  # a browser asks for the key
    assert keyed.get("/docs", headers={"Authorization": basic(KEY)}).status_code == 200
    with running_app(model_path, api_keys=KEYS) as default:  # metrics and docs open unless asked
        assert default.get("/metrics").status_code == 200 and default.get("/docs").status_code == 200
        assert default.get("/v1/model").status_code == 401


def test_keys_file_is_reloaded_when_it_changes(tmp_path, model_path, monkeypatch):
    import app.transports.http.api_keys

    monkeypatch.setattr(app.transports.http.api_keys, "RELOAD_CHECK_S", 0.0)
    old, new = new_key(), new_key()
    path = tmp_path / "api-keys"
    path.write_text(key_line("old", old) + "\n")
    with running_app(model_path, api_keys_file=path) as client:
        assert client.get("/v1/model", headers={"X-API-Key": old}).status_code == 200
        path.write_text(key_line("new", new) + "\n" + key_line("old", old) + "\n")  # rotation: both for a while
        assert client.get("/v1/model", headers={"X-API-Key": new}).status_code == 200
        path.write_text(key_line("new", new) + "\n")  # the old key withdrawn
        assert client.get("/v1/model", headers={"X-API-Key": old}).status_code == 401
        path.write_text("not a key line\n")  # a broken edit keeps the keys in use
        assert client.get("/v1/model", headers={"X-API-Key": new}).status_code == 200


def test_keys_are_stored_hashed_and_matched_by_name(tmp_path):
    first, second = new_key(), new_key()
    text = key_line("a", first) + "\n" + key_line("b", second, ("metrics",))
    assert first not in text and second not in text and first.startswith("btd_")
    store = KeyStore(inline=text)
    assert store.verify(first).name == "a" and store.verify(second).scopes == frozenset({"metrics"})
    assert store.verify(first[:-1]) is None and store.verify("") is None


@pytest.mark.parametrize("text,error", [("a:1234", "expected name"), ("a:" + "0" * 64 + ":admin", "unknown scope"),
                                        ("a:" + "0" * 64 + "\na:" + "1" * 64, "used twice"), ("# none", "no API keys")])
def test_bad_key_lines_are_refused_without_quoting_them(text, error):
    with pytest.raises(KeyFileError, match=error) as raised:
        KeyStore(inline=text)
    assert "1234" not in str(raised.value)


def test_server_refuses_to_start_without_its_keys_file(tmp_path):
    env = {**os.environ, "BTD_API_KEYS_FILE": str(tmp_path / "absent"), "BTD_MODEL_PATH": str(REPO / "README.md")}
    proc = subprocess.run([sys.executable, "-m", "app"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2 and "API keys" in proc.stderr and "absent" in proc.stderr


def test_api_keys_command_prints_the_key_once_and_only_its_hash_to_stdout():
    proc = subprocess.run([sys.executable, "-m", "app.transports.http.api_keys", "new", "pacs-router", "--scopes", "predict"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    key = proc.stderr.strip().rsplit(" ", 1)[-1]
    (line,) = parse_keys(proc.stdout, "stdout")
    assert line.name == "pacs-router" and line.scopes == frozenset({"predict"})
    assert key not in proc.stdout and KeyStore(inline=proc.stdout).verify(key).name == "pacs-router"


# --- rate limits ------------------------------------------------------------------------------------


def test_rate_limit_per_client_is_429_with_retry_after(model_path):
    other = new_key()
    keys = key_line("fast", KEY) + "\n" + key_line("other", other)
    with running_app(model_path, api_keys=keys, rate_limit_per_minute=6, rate_limit_burst=2) as client:
        sent = [client.post("/v1/predict", content=png_bytes(), headers={**PNG, "X-API-Key": KEY}) for _ in range(3)]
        assert [r.status_code for r in sent[:2]] == [200, 200]
        assert_problem(sent[2], 429, "rate-limited")
        assert 1 <= int(sent[2].headers["retry-after"]) <= 10  # one request per 10 s
        assert client.post("/v1/predict", content=png_bytes(), headers={**PNG, "X-API-Key": other}).status_code == 200
        assert client.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200  # only predictions count


def test_requests_without_a_valid_key_are_throttled_per_address(model_path, tmp_path):
    """Issue 21: 2,000 wrong keys from one client were 2,000 401s in 1.7 s and 2,000 audit lines."""
    audit = tmp_path / "audit.jsonl"
    with running_app(model_path, api_keys=KEYS, audit_log=str(audit), auth_failures_per_minute=6,
                     auth_failures_burst=3) as client:
        wrong = [client.get("/v1/model", headers={"X-API-Key": f"btd_guess{i}"}) for i in range(3)]
        assert [r.status_code for r in wrong] == [401] * 3
        throttled = [client.post("/v1/predict", content=png_bytes(), headers=PNG) for _ in range(20)]  # no key
        body = assert_problem(throttled[0], 429, "rate-limited")
        assert "valid API key" in body["detail"] and 1 <= int(throttled[0].headers["retry-after"]) <= 10
        assert {r.status_code for r in throttled} == {429}
        assert_problem(client.get("/v1/model", headers={"X-API-Key": "btd_again"}), 429, "rate-limited")
        # A valid key from the same address is still served: a guesser cannot lock a real client out.
        assert client.post("/v1/predict", content=png_bytes(), headers={**PNG, "X-API-Key": KEY}).status_code == 200
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(x["event"], x["status"]) for x in lines] == [("access-denied", 401)] * 3 + [
        ("access-throttled", 429), ("prediction", 200)]
    assert lines[3]["count"] == 1 and lines[3]["route"] == "/v1/predict" and lines[3]["problem"] == "rate-limited"


def test_throttled_refusals_fold_into_one_audit_line_per_client_a_minute(monkeypatch):
    from app.transports.http import guard

    now = [100.0]
    monkeypatch.setattr(guard.time, "monotonic", lambda: now[0])
    folded = guard.FoldedCounts(interval_s=60.0)
    assert [folded.add("10.0.0.1") for _ in range(5)] == [1, 0, 0, 0, 0]
    assert folded.add("10.0.0.2") == 1  # per client
    now[0] += 60.0
    assert folded.add("10.0.0.1") == 5  # this one and the four folded since the last line


# --- audit trail ------------------------------------------------------------------------------------


def test_audit_log_has_one_line_per_prediction_and_no_patient_data(model_path, tmp_path):
    from tests.hostile_inputs import dicom_with

    audit = tmp_path / "audit.jsonl"
    dicom = dicom_with("MR_small.dcm", PatientName="Secret^Patient", PatientID="PID-4711")
    with running_app(model_path, api_keys=KEYS, audit_log=str(audit)) as client:
        headers = {"X-API-Key": KEY, "X-Request-ID": "audit-1"}
        ok = client.post("/v1/predict?cam=grid&patient=Secret", content=dicom,
                         headers={**headers, "Content-Type": "application/dicom"}).json()
        client.post("/v1/predict", content=png_bytes()[:50], headers={**headers, "Content-Type": "image/png"})
        files = [("files", ("Secret^Patient.png", png_bytes())), ("files", ("b.txt", b"x", "text/plain"))]
        client.post("/v1/predict/batch", files=files, headers={"X-API-Key": KEY, "X-Request-ID": "audit-2"})
        client.get("/v1/model", headers={"X-API-Key": "btd_wrong"})
    text = audit.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    lines[2:4] = sorted(lines[2:4], key=lambda x: x["index"])  # a batch's files finish in any order
    assert [(x["event"], x["status"]) for x in lines] == [("prediction", 200), ("prediction", 400), ("prediction", 200),
                                                          ("prediction", 415), ("access-denied", 401)]
    assert [x["index"] for x in lines[:4]] == [None, None, 0, 1]  # batch files by position, never by name
    first = lines[0]
    assert first["request_id"] == "audit-1" and first["key"] == "pacs" and first["client"] == "testclient"
    assert first["model"] == ok["model"] and first["label"] == ok["label"]
    assert first["tumour_probability"] == ok["tumour_probability"] and first["tumour_detected"] == ok["tumour_detected"]
    assert first["timings_ms"] == ok["timings_ms"] and first["time"].endswith("Z")
    assert lines[1]["problem"] == "invalid-image" and lines[1]["label"] is None
    assert lines[4]["key"] is None and lines[4]["problem"] == "unauthorized"
    for secret in ("Secret", "PID-4711", KEY, "btd_wrong"):
        assert secret not in text


def test_audit_lines_carry_route_templates_never_the_raw_path(model_path, tmp_path):
    """A v2 model name is a path segment the client chooses: it may carry a patient's name."""
    audit = tmp_path / "audit.jsonl"
    secret = "Jane^Doe-1961"
    with running_app(model_path, api_keys=KEYS, audit_log=str(audit)) as client:
        request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(png_bytes()).decode()]}]}
        client.post(f"/v2/models/{secret}/infer", json=request, headers={"X-API-Key": KEY})  # 404, audited
        client.post(f"/v2/models/{secret}/versions/{secret}/infer", json=request)  # 401, audited
        client.get(f"/v1/{secret}", headers={"X-API-Key": "btd_wrong"})  # 401 on no route at all
    text = audit.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(x["event"], x["status"], x["route"]) for x in lines] == [
        ("prediction", 404, "/v2/models/{model_name}/infer"),
        ("access-denied", 401, "/v2/models/{model_name}/versions/{model_version}/infer"),
        ("access-denied", 401, "unmatched")]
    assert "Jane" not in text


def test_audit_log_off_writes_nothing(model_path, capsys):
    with running_app(model_path, audit_log="off") as client:
        client.post("/v1/predict", content=png_bytes(), headers=PNG)
    assert '"event":"prediction"' not in capsys.readouterr().out


# --- the request middleware -------------------------------------------------------------------------


def test_access_log_names_the_route_never_the_query_or_raw_path(client, caplog):
    with caplog.at_level(logging.INFO, logger="app.access"):
        client.post("/v1/predict?cam=grid&patient=Jane^Doe", content=png_bytes(), headers=PNG)
        client.get("/files/Jane^Doe.dcm")
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert '"POST /v1/predict" 200' in lines[0] and '"GET unmatched" 404' in lines[1]
    assert not any("Jane" in line or "?" in line for line in lines)


def test_invented_methods_share_one_metric_label(client):
    client.request("FROBNICATE", "/livez")
    from prometheus_client import REGISTRY

    methods = {s.labels["method"] for m in REGISTRY.collect() if m.name == "btd_http_request_duration_seconds"
               for s in m.samples}
    assert "other" in methods and "FROBNICATE" not in methods and methods <= {*metrics.HTTP_METHODS, "other"}


@pytest.mark.parametrize("path", ["/static/a%00b.js", "/v1/predict%0d%0aX:1", "/%7f"])
def test_control_characters_in_the_path_are_400(client, path):
    assert_problem(client.get(path), 400, "bad-request")


def test_nul_byte_reaching_a_static_lookup_is_404():
    from fastapi import HTTPException

    from app.transports.http.web import STATIC_DIR, file_under

    with pytest.raises(HTTPException) as raised:
        file_under(STATIC_DIR, "a\x00b")
    assert raised.value.status_code == 404


def test_body_over_the_limit_while_streaming_is_413(model_path):
    with running_app(model_path, max_body_bytes=2048, max_upload_bytes=4096) as client:
        chunks = (bytes(1024) for _ in range(4))  # no Content-Length: counted as it arrives
        assert_problem(client.post("/v1/predict", content=chunks, headers=PNG), 413, "payload-too-large")
        response = client.post("/v1/predict", content=bytes(3000), headers=PNG)
        assert_problem(response, 413, "payload-too-large")
        assert response.headers["connection"] == "close"


def test_client_hanging_up_mid_upload_is_499_at_info_not_a_server_error(model_path, caplog):
    """The ASGI app called as the server calls it, with a client that sends part of a body and goes."""
    app = create_app(Settings(model_path=model_path, allowed_hosts="testserver", audit_log="off"),
                     background_load=False)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"image/png"), (b"content-length", b"5000")]}
    messages = iter([{"type": "http.request", "body": b"x" * 100, "more_body": True}, {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    async def run():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    before = counter("btd_errors_total", type="client-disconnected")
    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert sent[0]["status"] == 499
    assert counter("btd_errors_total", type="client-disconnected") == before + 1
    records = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert records and all(r.levelno == logging.INFO for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_burst_log_writes_one_line_per_interval_and_counts_the_rest(caplog, monkeypatch):
    from app.transports.http import problems

    now = [100.0]
    monkeypatch.setattr(problems.time, "monotonic", lambda: now[0])
    burst = BurstLog(logging.getLogger("test.burst"), interval_s=10.0)
    with caplog.at_level(logging.WARNING, logger="test.burst"):
        written = [burst.log(logging.WARNING, "overloaded", "503 overloaded") for _ in range(50)]
        now[0] += 10.0
        burst.log(logging.WARNING, "overloaded", "503 overloaded")
        burst.log(logging.WARNING, "timeout", "504 timeout")
    assert written.count(True) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "503 overloaded", "503 overloaded (and 49 more since the last such line)", "504 timeout"]


def test_upload_budget_refuses_a_body_that_would_not_fit(model_path):
    with running_app(model_path, max_body_bytes=2048, max_upload_bytes=2048) as client:
        budget = next(m for m in _middlewares(client.app) if hasattr(m, "uploads")).uploads
        image = png_bytes((16, 16))
        held = budget.limit - len(image) + 1  # other uploads in progress hold all but one byte too few
        assert budget.take(held)
        try:
            response = client.post("/v1/predict", content=image, headers=PNG)
            body = assert_problem(response, 503, "overloaded")
            assert "uploads" in body["detail"] and response.headers["retry-after"] == "1"
        finally:
            budget.give_back(held)
        assert client.post("/v1/predict", content=png_bytes((16, 16)), headers=PNG).status_code == 200
        assert budget.held == 0


def _middlewares(app):
    layer = app.middleware_stack
    while layer is not None:
        yield layer
        layer = getattr(layer, "app", None)


def test_budget_is_reserved_only_after_the_guard_admits_the_request(model_path):
    """A client without a key cannot hold upload budget by announcing sizes: it meets the 401 first."""
    with running_app(model_path, api_keys=KEYS, max_body_bytes=2048, max_upload_bytes=2048) as client:
        budget = next(m for m in _middlewares(client.app) if hasattr(m, "uploads")).uploads
        assert budget.take(budget.limit - 10)
        try:
            image = png_bytes((16, 16))
            assert_problem(client.post("/v1/predict", content=image, headers=PNG), 401, "unauthorized")
            assert_problem(client.post("/v1/predict", content=image, headers={**PNG, "X-API-Key": KEY}), 503,
                           "overloaded")
        finally:
            budget.give_back(budget.limit - 10)
        assert budget.held == 0


def test_upload_budget_holds_the_bytes_that_arrived_not_the_announced_length(model_path):
    """Clients that announce a large body and send nothing hold no budget (issue 21: eight announcing
    32 MiB each refused every real upload until their body timeout)."""
    from app.transports.http.middleware import UploadBudget, _Body

    settings = Settings(model_path=model_path, max_body_bytes=4096, max_upload_bytes=8192)
    budget = UploadBudget(settings.max_upload_bytes)

    async def run() -> None:
        arrived = asyncio.Event()

        async def receive():
            await arrived.wait()
            return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

        bodies = [_Body(receive, settings, budget) for _ in range(8)]  # each "Content-Length: 4096"
        reading = [asyncio.create_task(body.receive()) for body in bodies]
        await asyncio.sleep(0.05)
        assert budget.held == 0  # announced, nothing sent: nothing held
        arrived.set()
        await asyncio.gather(*reading)
        assert budget.held == 8000
        for body in bodies:
            body.release()
        assert budget.held == 0

    asyncio.run(run())


def test_open_inference_protocol_needs_the_key_but_not_its_probes(keyed, tmp_path, model_path):
    """/v2/models/* (metadata and infer) is the model, as /v1 is; /v2/health/* and a model's /ready
    are probes. Each inferred image is an audit line."""
    model = keyed.get("/v1/model", headers={"X-API-Key": KEY}).json()
    name = model["name"]
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{name}/ready", "/v2"):
        assert keyed.get(path).status_code == 200, path
    body = assert_problem(keyed.get(f"/v2/models/{name}"), 401, "unauthorized")
    assert body["error"] == body["detail"]  # the protocol's clients read "error"
    request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(png_bytes(seed=i)).decode() for i in range(2)]}]}
    assert_problem(keyed.post(f"/v2/models/{name}/infer", json=request), 401, "unauthorized")
    response = keyed.post(f"/v2/models/{name}/infer", json=request, headers={"X-API-Key": KEY})
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    audit = tmp_path / "audit.jsonl"
    with running_app(model_path, api_keys=KEYS, audit_log=str(audit)) as client:
        answer = client.post(f"/v2/models/{name}/infer", json=request, headers={"X-API-Key": KEY}).json()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    probabilities = next(o for o in answer["outputs"] if o["name"] == "probabilities")["data"]
    labels = model["labels"]
    expected = [labels[max(range(len(labels)), key=lambda c: probabilities[i * len(labels) + c])] for i in range(2)]
    assert [(x["index"], x["key"], x["label"], x["status"]) for x in lines] == [
        (0, "pacs", expected[0], 200), (1, "pacs", expected[1], 200)]


def test_v2_audit_line_makes_the_same_decision_as_v1_for_an_out_of_distribution_image(tmp_path):
    # Every image is out of distribution for this model (its OOD threshold is below any score): /v1
    # makes no tumour decision, and the v2 audit line of the same image must not make one either.
    from tests.model_factory import build_model

    model = build_model(tmp_path / "ood.onnx", ood_threshold=-1e9)
    audit = tmp_path / "audit.jsonl"
    with running_app(model, audit_log=str(audit)) as client:
        v1 = client.post("/v1/predict", content=png_bytes(), headers=PNG).json()
        request = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                               "data": [base64.b64encode(png_bytes()).decode()]}]}
        name = client.get("/v1/model").json()["name"]
        assert client.post(f"/v2/models/{name}/infer", json=request).status_code == 200
    v1_line, v2_line = (json.loads(line) for line in audit.read_text().splitlines())
    assert v1["in_distribution"] is False and v1["tumour_detected"] is None
    for line in (v1_line, v2_line):
        assert line["tumour_detected"] is None and line["in_distribution"] is False
        assert line["label"] == v1["label"] and line["tumour_probability"] == pytest.approx(v1["tumour_probability"])
