"""The committed OpenAPI document is the app's, and the app honours it (schemathesis, in-process).

Regenerate the document after an API change with ``.venv/bin/python -m app.transports.http.spec``."""

import json
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from app.core.contract import LocalisationSpec
from app.settings import Settings
from app.transports.http.api_keys import key_line, new_key
from app.transports.http.main import create_app
from app.transports.http.spec import SPEC_PATH, generate, render
from tests.api import schemathesis_hooks  # noqa: F401  (registers the DICOM body serializer)
from tests.api.helpers import TEST_HOST
from tests.model_factory import build_model


def test_committed_openapi_matches_the_app():
    assert SPEC_PATH.is_file(), "run: .venv/bin/python -m app.transports.http.spec"
    assert SPEC_PATH.read_text() == render(generate()), "openapi/openapi.json is stale: run python -m app.transports.http.spec"


def test_openapi_documents_problem_json_for_every_error_status():
    spec = json.loads(SPEC_PATH.read_text())
    access = {"401", "403", "429"}  # API keys (429: too many without a valid one), cross-site browser requests
    upload = {"408", "429"}  # body timeout, rate limit
    v2_model = {"200", "400", "404", "422", "503"}
    v2_infer = {"200", "400", "404", "413", "415", "422", "503", "504"} | access | upload
    expected = {"predict": {"200", "400", "406", "413", "415", "422", "503", "504"} | access | upload,
                "predictBatch": {"200", "400", "413", "415", "422", "503"} | access | upload,
                "getModel": {"200", "400", "503"} | access, "readyz": {"200", "400", "503"},
                "livez": {"200", "400", "503"}, "metrics": {"200", "400"} | access,  # 400: invalid-host
                "v2ServerMetadata": {"200", "400"}, "v2Live": {"200", "400", "503"}, "v2Ready": {"200", "400", "503"},
                "v2ModelMetadata": v2_model | access, "v2ModelVersionMetadata": v2_model | access,
                "v2ModelReady": v2_model, "v2ModelVersionReady": v2_model,  # probes: open whatever the keys
                "v2ModelInfer": v2_infer, "v2ModelVersionInfer": v2_infer}
    seen = {}
    for ops in spec["paths"].values():
        for op in ops.values():
            seen[op["operationId"]] = set(op["responses"])
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert list(response["content"]) == ["application/problem+json"], (op["operationId"], status)
    assert seen == expected
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    secured = {op["operationId"] for ops in spec["paths"].values() for op in ops.values() if op.get("security")}
    assert secured == {"predict", "predictBatch", "getModel", "v2ModelMetadata", "v2ModelVersionMetadata",
                       "v2ModelInfer", "v2ModelVersionInfer"}  # probes and metrics stay open by default


# Built at import: schemathesis parametrizes at collection time. The lifespan it starts ends with the test.
_MODEL_DIR = tempfile.TemporaryDirectory(prefix="btd-schemathesis-")
# With API keys, as a hospital deploys it: the documented security scheme is then checked for real
# (schemathesis' ignored_auth check sends requests without the key and expects them refused, with 401
# each time: the throttle of requests without a valid key, which would answer 429, is off).
API_KEY = new_key()
# A model with a tumour map, so the answers checked against the spec carry the region when one is found.
APP = create_app(Settings(model_path=build_model(Path(_MODEL_DIR.name) / "m.onnx", localisation=LocalisationSpec()),
                          max_body_bytes=256 * 1024,
                          allowed_hosts=TEST_HOST, api_keys=key_line("schemathesis", API_KEY), audit_log="off",
                          auth_failures_per_minute=0),
                 background_load=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi(case):
    # "format: binary" admits any bytes, yet only real images can be accepted: for bodies whose bytes
    # schemathesis makes up (octet-stream, multipart parts) a 4xx for valid-looking data is right.
    # Likewise a schema-valid v2 inference request (its schema cannot say that data fills the shape), and
    # format=dicom with a PNG or JPEG body (DICOM results need a DICOM source: a documented 406).
    arbitrary_bytes = case.media_type in ("application/octet-stream", "multipart/form-data") or \
        case.operation.path.endswith("/infer") or \
        ((case.query or {}).get("format") == "dicom" and case.media_type != "application/dicom")
    case.call_and_validate(headers={"X-API-Key": API_KEY},
                           excluded_checks=[positive_data_acceptance] if arbitrary_bytes else None)
