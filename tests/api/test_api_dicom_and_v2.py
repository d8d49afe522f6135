"""The API's DICOM answers (format=dicom, Accept) and the Open Inference Protocol (KServe v2) endpoints,
in process; Triton's own HTTP client against the real server."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest

from app.core.contract import preprocess
from app.core.decode import decode
from app.transports.pacs.multipart import decode_related
from tests.api.helpers import ServerProcess, assert_matches_spec, assert_problem, png_bytes
from tests.pacs.dicom_checks import SENTINEL_NAME, mr_slice, read

MODEL = "btd-test"


def test_format_dicom_answers_sr_and_overlay_referencing_the_input(client):
    data = mr_slice()
    response = client.post("/v1/predict?format=dicom", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert "infer;dur=" in response.headers["server-timing"]
    parts = decode_related(response.content, response.headers["content-type"])
    sr, sc = (read(p) for _, p in parts)
    assert [t for t, _ in parts] == ["application/dicom"] * 2
    assert (sr.Modality, sc.SOPClassUID.name) == ("SR", "Secondary Capture Image Storage")
    assert sr.StudyInstanceUID == read(data).StudyInstanceUID == sc.StudyInstanceUID
    same = client.post("/v1/predict", content=data, headers={
        "Content-Type": "application/dicom", "Accept": 'multipart/related; type="application/dicom"'})
    assert [read(p).SOPInstanceUID for _, p in decode_related(same.content, same.headers["content-type"])] == \
        [sr.SOPInstanceUID, sc.SOPInstanceUID]


def test_accept_application_dicom_answers_the_sr_alone(client):
    response = client.post("/v1/predict", content=mr_slice(),
                           headers={"Content-Type": "application/dicom", "Accept": "application/dicom"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    assert read(response.content).SOPClassUID.name == "Comprehensive SR Storage"


def test_dicom_results_of_a_png_are_406(client):
    response = client.post("/v1/predict?format=dicom", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert "DICOM input" in assert_problem(response, 406, "not-acceptable")["detail"]
    json_answer = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert json_answer.status_code == 200 and json_answer.json()["label"]  # JSON stays the default


def test_dicom_answers_keep_patient_data_out_of_logs(client, caplog):
    data = mr_slice()
    with caplog.at_level(logging.DEBUG):
        response = client.post("/v1/predict?format=dicom", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200
    assert SENTINEL_NAME not in caplog.text and "SENTINEL" not in caplog.text
    assert str(read(data).SOPInstanceUID) not in caplog.text and str(read(data).StudyInstanceUID) not in caplog.text


# ---------------------------------------------------------------- Open Inference Protocol


def _input(client) -> tuple[np.ndarray, dict]:
    spec = client.get("/v1/model").json()["input"]
    x = np.random.default_rng(1).normal(size=(2, spec["channels"], spec["size"], spec["size"])).astype(np.float32)
    return x, {"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


def test_v2_health_and_metadata(client):
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True}),
                       (f"/v2/models/{MODEL}/ready", {"name": MODEL, "ready": True})):
        response = client.get(path)
        assert response.status_code == 200 and response.json() == body
        assert_matches_spec(response)
    meta = client.get(f"/v2/models/{MODEL}").json()
    native = client.get("/v1/model").json()
    assert meta["versions"] == [native["version"]] and meta["parameters"]["labels"] == native["labels"]
    assert {t["name"]: t["shape"] for t in meta["inputs"]}["image"] == [-1, 3, native["input"]["size"],
                                                                        native["input"]["size"]]
    assert client.get(f"/v2/models/{MODEL}/versions/{native['version']}").json() == meta
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]


def test_v2_infer_tensor_gives_logits_and_calibrated_probabilities(client):
    _, item = _input(client)
    response = client.post(f"/v2/models/{MODEL}/infer", json={"id": "req-1", "inputs": [item]})
    assert response.status_code == 200, response.text
    assert_matches_spec(response)
    body = response.json()
    assert body["id"] == "req-1" and body["model_name"] == MODEL
    out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    assert out["logits"].shape == out["probabilities"].shape == (2, 4)
    z = out["logits"] / client.get("/v1/model").json()["temperature"]
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(out["probabilities"], expected / expected.sum(1, keepdims=True), atol=1e-6)
    assert not np.allclose(out["logits"][0], out["logits"][1])  # each row is its own input


def test_v2_image_bytes_match_the_native_prediction(client):
    image = png_bytes(seed=3)
    native = client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"}).json()
    request = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                           "data": [base64.b64encode(image).decode()]}], "outputs": [{"name": "probabilities"}]}
    body = client.post(f"/v2/models/{MODEL}/infer", json=request).json()
    assert [o["name"] for o in body["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(body["outputs"][0]["data"], list(native["probabilities"].values()), atol=1e-6)
    # ... and a preprocessed tensor of the same image gives the same answer
    spec = client.get("/v1/model").json()["input"]
    from app.core.contract import PreprocessSpec

    tensor = preprocess(decode(image).pixels, PreprocessSpec.from_json(json.dumps(spec)))
    same = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{
        "name": "image", "shape": [1, *tensor.shape], "datatype": "FP32", "data": tensor.ravel().tolist()}],
        "outputs": [{"name": "probabilities"}]}).json()
    np.testing.assert_allclose(same["outputs"][0]["data"], body["outputs"][0]["data"], atol=1e-5)


def test_v2_binary_tensor_extension(client):
    x, item = _input(client)
    header = json.dumps({"inputs": [{**{k: v for k, v in item.items() if k != "data"},
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    response = client.post(f"/v2/models/{MODEL}/infer", content=header + x.astype("<f4").tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header)),
                                    "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    logits = np.frombuffer(response.content[length:], "<f4").reshape(meta["outputs"][0]["shape"])
    as_json = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [item], "outputs": [{"name": "logits"}]})
    np.testing.assert_allclose(logits.ravel(), as_json.json()["outputs"][0]["data"], atol=1e-6)


@pytest.mark.parametrize(("change", "status", "slug"), [
    (lambda item: {**item, "shape": [2, 3, 5, 5]}, 400, "invalid-tensor"),
    (lambda item: {**item, "datatype": "INT8"}, 400, "invalid-tensor"),
    (lambda item: {**item, "data": item["data"][:-1]}, 400, "invalid-tensor"),
    (lambda item: {**item, "data": [[1.0], "x"]}, 400, "invalid-tensor"),
    (lambda item: {**item, "name": "pixels"}, 400, "invalid-tensor"),
    (lambda item: {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["bm90IGFuIGltYWdl"]},
     415, "unsupported-media-type"),
])
def test_v2_bad_tensors_are_4xx_with_the_protocols_error_member(client, change, status, slug):
    _, item = _input(client)
    response = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [change(item)]})
    body = assert_problem(response, status, slug)
    assert body["error"] == body["detail"]


def test_v2_nested_tensor_data_is_accepted(client):
    x, item = _input(client)
    flat = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [item]}).json()
    nested = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{**item, "data": x.tolist()}]})
    assert nested.status_code == 200, nested.text
    assert nested.json()["outputs"] == flat["outputs"]


@pytest.mark.parametrize("filler", [b"[],", b"0.5,", b"{},", b"[[[[[[[[", b'"a","b",'])
def test_v2_json_with_more_values_than_its_shapes_need_is_refused_before_parsing(client, filler):
    """Issue 21: 31 MB of ``[],`` made 10 million lists (+1.2 GiB, the event loop blocked 8 s)."""
    spec = client.get("/v1/model").json()["input"]
    shape = [1, spec["channels"], spec["size"], spec["size"]]
    need = int(np.prod(shape))
    for declared in (shape, [16, *shape[1:]], None):  # as sent; the largest batch; no shape at all
        head = {"name": "image", "datatype": "FP32", **({"shape": declared} if declared else {})}
        prefix = json.dumps({"inputs": [{**head, "data": []}]}).encode()[: -len(b"]}]}")]
        body = prefix + filler * (2 * 16 * need + 4096) + b"0]}]}"
        response = client.post(f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Type": "application/json"})
        body = assert_problem(response, 400, "invalid-tensor")
        assert "declares need at most" in body["detail"] and body["error"] == body["detail"]


def test_v2_json_cost_counts_values_and_nesting():
    from app.transports.http.v2 import declared_shapes, json_values_at_most, tensor_values

    assert tensor_values([2, 3]) == 6 + 1 + 2  # six numbers, the outer array and two rows
    assert tensor_values([4]) == 5 and tensor_values([-1, 3]) == 1 + 0
    assert json_values_at_most(json.dumps([[1, 2, 3], [4, 5, 6]]).encode()) >= 9
    assert json_values_at_most(b'["a,b", 1]') == 4  # a comma in a string only raises the bound
    assert declared_shapes(b'{"shape": [1, 3, 64, 64], "x": {"shape":[2]}, "shape": "no"}') == [[1, 3, 64, 64], [2]]


def test_v2_unknown_model_or_version_is_404(client):
    assert_problem(client.get("/v2/models/other"), 404, "model-not-found")
    assert_problem(client.get(f"/v2/models/{MODEL}/versions/9.9.9/ready"), 404, "model-not-found")
    response = client.post("/v2/models/other/infer", json={"inputs": []})
    assert_problem(response, 404, "model-not-found")


@pytest.mark.slow
def test_triton_http_client_works_unchanged(model_path):
    """Triton's own client (binary tensors by default, JSON on request, BYTES) against the real server."""
    httpclient = pytest.importorskip("tritonclient.http")
    with ServerProcess(model_path) as server:
        triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
            meta = triton.get_model_metadata(MODEL)
            size = meta["inputs"][0]["shape"][-1]
            x = np.random.default_rng(2).normal(size=(3, 3, size, size)).astype(np.float32)
            binary = httpclient.InferInput("image", list(x.shape), "FP32")
            binary.set_data_from_numpy(x)
            as_json = httpclient.InferInput("image", list(x.shape), "FP32")
            as_json.set_data_from_numpy(x, binary_data=False)
            a = triton.infer(MODEL, [binary])
            b = triton.infer(MODEL, [as_json], model_version=meta["versions"][0],
                             outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
            assert a.as_numpy("logits").shape == (3, 4)
            np.testing.assert_allclose(a.as_numpy("probabilities"), b.as_numpy("probabilities"), atol=1e-6)
            files = httpclient.InferInput("image_bytes", [2], "BYTES")
            files.set_data_from_numpy(np.array([png_bytes(seed=1), mr_slice()], dtype=np.object_))
            probabilities = triton.infer(MODEL, [files]).as_numpy("probabilities")
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
            with pytest.raises(Exception, match="not other"):
                triton.infer("other", [binary])
        finally:
            triton.close()


def test_v2_health_follows_the_native_probes(client):
    state = client.app.state.runtime
    state.draining = True  # what SIGTERM sets
    try:
        body = assert_problem(client.get("/v2/health/ready"), 503, "model-not-ready")
        assert body["error"] == body["detail"] and "shutting down" in body["detail"]
        assert client.get("/v2/health/live").json() == {"live": True}
        state.load_error = "broken model"
        assert_problem(client.get("/v2/health/live"), 503, "model-not-ready")
    finally:
        state.draining, state.load_error = False, None
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_v2_answers_the_ood_score_of_a_model_that_has_one(tmp_path):
    from tests.api.helpers import running_app
    from tests.model_factory import build_model

    with running_app(build_model(tmp_path / "ood.onnx", ood_threshold=0.25)) as ood_client:
        meta = ood_client.get("/v2/models/btd-test").json()
        assert {"name": "ood_score", "datatype": "FP32", "shape": [-1]} in meta["outputs"]
        assert meta["parameters"]["ood_threshold"] == 0.25
        image = png_bytes(seed=5)
        native = ood_client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"}).json()
        request = {"inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                               "data": [base64.b64encode(image).decode()] * 2}]}
        response = ood_client.post("/v2/models/btd-test/infer", json=request)
        assert response.status_code == 200, response.text
        assert_matches_spec(response)
        out = {o["name"]: o for o in response.json()["outputs"]}
        assert list(out) == ["logits", "probabilities", "ood_score"] and out["ood_score"]["shape"] == [2]
        np.testing.assert_allclose(out["ood_score"]["data"], [native["ood_score"]] * 2, rtol=1e-5)
    # a model without the output neither lists nor answers it
    with running_app(build_model(tmp_path / "plain.onnx")) as plain:
        assert "ood_score" not in [o["name"] for o in plain.get("/v2/models/btd-test").json()["outputs"]]
        refused = plain.post("/v2/models/btd-test/infer", json={**request, "outputs": [{"name": "ood_score"}]})
        assert refused.status_code == 400 and "ood_score" in refused.text


def test_v2_answers_the_tumour_map_of_a_localising_model(tmp_path, client):
    from app.core.contract import LocalisationSpec
    from tests.api.helpers import running_app
    from tests.model_factory import build_model, tumour_slice_png

    with running_app(build_model(tmp_path / "loc.onnx", size=64, localisation=LocalisationSpec(0.4, 0.01))) as loc:
        meta = loc.get("/v2/models/btd-test").json()
        assert {"name": "tumour_map", "datatype": "FP32", "shape": [-1, 1, 16, 16]} in meta["outputs"]
        assert meta["parameters"]["localisation"] == {"threshold": 0.4, "min_area": 0.01}
        images = [tumour_slice_png(blob=(200, 100)), tumour_slice_png(blob=(120, 150))]
        request = {"inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                               "data": [base64.b64encode(i).decode() for i in images]}],
                   "outputs": [{"name": "tumour_map"}, {"name": "logits"}]}
        response = loc.post("/v2/models/btd-test/infer", json=request)
        assert response.status_code == 200, response.text
        assert_matches_spec(response)
        out = {o["name"]: o for o in response.json()["outputs"]}
        assert list(out) == ["tumour_map", "logits"] and out["tumour_map"]["shape"] == [2, 1, 16, 16]
        maps = np.array(out["tumour_map"]["data"]).reshape(2, 16, 16)
        assert ((maps >= 0) & (maps <= 1)).all()
        peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
        assert peaks[0] != peaks[1]  # each image its own map: the blobs lie apart
    # a model without the output neither lists nor answers it
    assert "tumour_map" not in [o["name"] for o in client.get("/v2/models/btd-test").json()["outputs"]]
    refused = client.post("/v2/models/btd-test/infer", json={**request, "outputs": [{"name": "tumour_map"}]})
    assert refused.status_code == 400 and "tumour_map" in refused.text
