"""Every answer of the HTTP API is recorded (app/engine/records) without patient data, and a
database that stops mid-load costs records, never answers."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from prometheus_client import REGISTRY

from app.engine.records.store import RecordStore
from tests.api.helpers import png_bytes, running_app
from tests.pacs.dicom_checks import mr_slice
from tests.postgres import started_postgres

MODEL = "btd-test"
SENTINEL = "Sentinel^Patient"


def rows(url: str) -> list[dict]:
    with RecordStore(url) as store:
        return store.rows()


def lost() -> float:
    return sum(REGISTRY.get_sample_value("btd_records_lost_total", {"reason": reason}) or 0.0
               for reason in ("database", "queue-full", "shutdown"))


def sentinel_dicom() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(mr_slice()))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SENTINEL, "SENTINEL-ID-0815", "19010101"
    ds.InstitutionName, ds.ReferringPhysicianName = "Sentinel Hospital", "Sentinel^Doctor"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_v1_predict_batch_and_v2_infer_answers_are_recorded(model_path: Path, tmp_path: Path):
    image, other = png_bytes((160, 200), seed=1), png_bytes((160, 200), seed=2)
    with running_app(model_path, records_dir=tmp_path) as client:
        one = client.post("/v1/predict", content=image, headers={"Content-Type": "image/png", "X-Request-ID": "r-one"})
        again = client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
        batch = client.post("/v1/predict/batch", files=[("files", ("a.png", image, "image/png")),
                                                        ("files", ("b.png", other, "image/png"))])
        spec = client.get("/v1/model").json()["input"]
        x = np.random.default_rng(1).normal(size=(2, spec["channels"], spec["size"], spec["size"])).astype(np.float32)
        v2 = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        v2_bytes = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]})
        refused = client.post("/v1/predict", content=b"not an image", headers={"Content-Type": "image/png"})
    assert {r.status_code for r in (one, again, batch, v2, v2_bytes)} == {200} and refused.status_code >= 400
    records = rows(f"sqlite:///{tmp_path / 'btd.db'}")  # the app closed: its writer flushed
    first_id = {}
    for r in records:
        first_id.setdefault(r["request_id"], r["id"])
    records.sort(key=lambda r: (first_id[r["request_id"]], r["item"] or 0))  # a batch's images finish in any order
    assert [(r["transport"], r["route"], r["item"]) for r in records] == [
        ("http-v1", "/v1/predict", None), ("http-v1", "/v1/predict", None),
        ("http-v1", "/v1/predict/batch", 0), ("http-v1", "/v1/predict/batch", 1),
        ("http-v2", "/v2/models/{model_name}/infer", 0), ("http-v2", "/v2/models/{model_name}/infer", 1),
        ("http-v2", "/v2/models/{model_name}/infer", 0)]
    first, second, batch_a, batch_b, tensor_a, tensor_b, v2_png = records
    answer = one.json()
    assert first["request_id"] == "r-one" == answer["request_id"]
    assert (first["label"], first["probabilities"], first["tumour_probability"], first["tumour_detected"]) == (
        answer["label"], answer["probabilities"], answer["tumour_probability"], answer["tumour_detected"])
    assert first["assessed"] is (answer["in_distribution"] is not False)
    assert first["total_ms"] == answer["timings_ms"]["total"] and first["inference_ms"] is not None
    assert (first["model_name"], first["model_version"], first["model_sha256"]) == tuple(answer["model"].values())
    assert (first["width"], first["height"], first["media_type"]) == (200, 160, "image/png")
    assert first["intensity_p01"] <= first["intensity_p50"] <= first["intensity_p99"]
    # The same pixels hash the same, whichever route brought them; other pixels do not.
    assert first["pixels_sha256"] == second["pixels_sha256"] == batch_a["pixels_sha256"] == v2_png["pixels_sha256"]
    assert batch_b["pixels_sha256"] != batch_a["pixels_sha256"]
    assert second["request_id"] == again.headers["x-request-id"] != first["request_id"]
    assert batch_a["label"] == batch.json()["results"][0]["result"]["label"]
    probabilities = np.array(next(o["data"] for o in v2.json()["outputs"] if o["name"] == "probabilities"))
    probabilities = probabilities.reshape(2, -1)
    np.testing.assert_allclose(list(tensor_a["probabilities"].values()), probabilities[0], atol=1e-6)
    assert tensor_a["media_type"] == "tensor" and tensor_a["intensity_p50"] is None
    assert tensor_a["pixels_sha256"] != tensor_b["pixels_sha256"] and tensor_a["total_ms"] is None


def test_a_sentinel_patient_never_reaches_the_database(model_path: Path, tmp_path: Path):
    data = sentinel_dicom()
    with running_app(model_path, records_dir=tmp_path) as client:
        for query in ("", "?format=dicom"):
            response = client.post(f"/v1/predict{query}", content=data, headers={"Content-Type": "application/dicom"})
            assert response.status_code == 200
        batch = client.post("/v1/predict/batch", files=[("files", ("Sentinel^Patient.dcm", data, "application/dicom"))])
        assert batch.status_code == 200
    records = rows(f"sqlite:///{tmp_path / 'btd.db'}")
    assert len(records) == 3 and {r["modality"] for r in records} == {"MR"}
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())  # the database, its WAL
    for text in ("Sentinel", "SENTINEL", "0815", "19010101", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)):
        assert text.encode() not in stored, text


def test_records_off_writes_nothing(model_path: Path, tmp_path: Path):
    with running_app(model_path, records_dir=tmp_path, records=False) as client:
        assert client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"}).status_code == 200
    assert not (tmp_path / "btd.db").exists()


def load(client, count: int, on_half=None) -> list[int]:
    """``count`` predictions from 4 threads; ``on_half`` runs once half were sent."""
    image = png_bytes((160, 200), seed=5)

    def one(i: int) -> int:
        if i == count // 2 and on_half is not None:
            on_half()
        return client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"}).status_code

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(count)))


def test_postgres_stopped_mid_load_fails_no_prediction_and_counts_lost_records(model_path: Path):
    server = started_postgres()  # its own server: this test stops it
    try:
        url = server.database()
        before = lost()
        with running_app(model_path, database_url=url) as client:
            assert load(client, 10) == [200] * 10
            deadline = time.monotonic() + 10
            while len(rows(url)) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            statuses = load(client, 60, on_half=server.stop)
            metrics = client.get("/metrics").text
        assert statuses == [200] * 60  # 0 failed predictions
        written = len(rows_after_restart(server, url))
        assert written >= 10 and lost() - before == 70 - written > 0
        assert "btd_records_lost_total" in metrics
    finally:
        server.remove()


def rows_after_restart(server, url: str) -> list[dict]:
    server.start()
    return rows(url)


def test_sqlite_locked_mid_load_fails_no_prediction_and_counts_lost_records(model_path: Path, tmp_path: Path):
    import sqlite3

    path = tmp_path / "btd.db"
    before = lost()
    with running_app(model_path, records_dir=tmp_path, records_queue_size=4) as client:
        assert load(client, 8) == [200] * 8
        deadline = time.monotonic() + 10
        while len(rows(f"sqlite:///{path}")) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)

        # Another process takes the write lock: the database is "down" for writes. The writer's next
        # batch then waits its busy timeout (5 s) while the load goes on; the queue (4) overflows.
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN EXCLUSIVE")
        statuses = load(client, 5)
        time.sleep(0.6)  # past the writer's linger (0.2 s): its batch is now waiting for the lock
        statuses += load(client, 55)
        assert statuses == [200] * 60  # 0 failed predictions
        assert lost() - before > 0  # the full queue dropped records (counted), answers went on
        blocker.execute("ROLLBACK")
        blocker.close()
    written = len(rows(f"sqlite:///{path}"))
    assert written + (lost() - before) == 68


def test_v2_image_bytes_are_decided_as_v1_decides_them(model_path: Path, tmp_path: Path):
    # A 96x128 slice is too small to be a whole slice: v1 makes no finding; a v2 record of the same
    # bytes must say the same (one decision), though the client gets only logits and probabilities.
    small = png_bytes((96, 128), seed=7)
    with running_app(model_path, records_dir=tmp_path) as client:
        v1 = client.post("/v1/predict", content=small, headers={"Content-Type": "image/png"})
        v2 = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(small).decode()]}]})
    assert v1.status_code == v2.status_code == 200
    assert v1.json()["in_distribution"] is False and "small-image" in v1.json()["ood_reasons"]
    v1_record, v2_record = rows(f"sqlite:///{tmp_path / 'btd.db'}")
    for field in ("assessed", "not_assessed_reasons", "tumour_detected", "label", "pixels_sha256"):
        assert v1_record[field] == v2_record[field], field
    assert v2_record["assessed"] is False and "small-image" in v2_record["not_assessed_reasons"]
