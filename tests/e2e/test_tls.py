"""HTTPS served by the service itself (BTD_TLS_CERTFILE / BTD_TLS_KEYFILE, uvicorn's TLS), for
installs without a TLS-terminating ingress: a client that trusts the CA gets its answers, with HSTS;
plain HTTP on that port gets nothing; a missing certificate file stops the start."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trustme

from tests.api.helpers import ServerProcess, png_bytes
from tests.model_factory import build_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_server_speaks_https_with_the_configured_certificate(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with ServerProcess(build_model(tmp_path / "m.onnx"), scheme="https", verify=trusting,
                       BTD_TLS_CERTFILE=str(cert_file), BTD_TLS_KEYFILE=str(key_file)) as server:
        with httpx.Client(base_url=server.url, verify=trusting, timeout=30) as client:
            response = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
            assert response.status_code == 200 and response.json()["label"]
            assert response.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.HTTPError):  # an untrusted certificate is refused by a careful client
            httpx.get(server.url + "/livez", timeout=5)
        plain = server.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(plain + "/livez", timeout=5)


def test_server_refuses_to_start_without_its_certificate(tmp_path):
    env = {**os.environ, "BTD_MODEL_PATH": str(build_model(tmp_path / "m.onnx")),
           "BTD_TLS_CERTFILE": str(tmp_path / "absent.pem"), "BTD_TLS_KEYFILE": str(tmp_path / "absent.key")}
    proc = subprocess.run([sys.executable, "-m", "app"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "BTD_TLS_CERTFILE" in proc.stderr
