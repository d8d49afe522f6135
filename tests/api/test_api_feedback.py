"""POST /v1/feedback: a reader's finding joins the prediction record of the answer they saw (README,
"Readers' feedback"): its own API key scope, one reading per prediction and reader, problem+json for
whatever cannot be stored."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom

from app.engine.records.store import RecordStore
from app.transports.http.api_keys import key_line, new_key
from tests.api.helpers import assert_matches_spec, assert_problem, png_bytes, running_app
from tests.api.test_api_records import sentinel_dicom


def stored(tmp_path: Path) -> tuple[list[dict], list[dict]]:
    with RecordStore(f"sqlite:///{tmp_path / 'btd.db'}") as store:
        return store.rows(), store.feedback()


def predict(client, seed: int = 1) -> dict:
    response = client.post("/v1/predict", content=png_bytes((160, 200), seed=seed), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def other_label(answer: dict) -> str:
    return next(label for label in answer["probabilities"] if label != answer["label"])


def test_a_reading_is_stored_once_per_reader_and_a_correction_replaces_it(model_path: Path, tmp_path: Path):
    audit = tmp_path / "audit.jsonl"
    with running_app(model_path, records_dir=tmp_path, audit_log=str(audit)) as client:
        answer = predict(client)  # feedback at once: its record may still wait in the writer's queue
        body = {"request_id": answer["request_id"], "label": answer["label"], "reader_id": "reader-7"}
        first = client.post("/v1/feedback", json=body)
        again = client.post("/v1/feedback", json=body)
        corrected = client.post("/v1/feedback", json={**body, "label": other_label(answer)})
        second_reader = client.post("/v1/feedback", json={**body, "reader_id": "reader_8"})
        anonymous = client.post("/v1/feedback", json={"request_id": answer["request_id"], "tumour_present": True})
    for response in (first, again, corrected, second_reader, anonymous):
        assert_matches_spec(response)
    assert [r.status_code for r in (first, again, corrected, second_reader, anonymous)] == [201, 200, 200, 201, 201]
    assert [r.json()["outcome"] for r in (first, again, corrected)] == ["created", "unchanged", "replaced"]
    created = first.json()
    assert {**again.json(), "outcome": "created"} == created  # the same reading, not a duplicate
    assert corrected.json()["feedback_id"] == created["feedback_id"]
    assert corrected.json()["created_at"] == created["created_at"] <= corrected.json()["updated_at"]
    assert created["model"]["version"] == answer["model"]["version"]
    assert created["prediction"] == {"label": answer["label"], "tumour_detected": answer["tumour_detected"]}
    assert created["tumour_present"] is (answer["label"] != "notumor")  # the test model has a no-tumour class
    records, feedback = stored(tmp_path)
    assert len(records) == 1 and len(feedback) == 3
    assert {f["prediction_id"] for f in feedback} == {records[0]["id"]}
    by_reader = {f["reader_id"]: f for f in feedback}
    assert by_reader["reader-7"]["label"] == other_label(answer)  # the correction
    assert by_reader["reader_8"]["label"] == answer["label"]
    assert by_reader[""]["label"] is None and by_reader[""]["tumour_present"] is True
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    trail = [(e["outcome"], e["reader_id"], e["feedback_id"]) for e in lines if e["event"] == "feedback"]
    assert trail == [(r.json()["outcome"], r.json()["reader_id"], r.json()["feedback_id"])
                     for r in (first, again, corrected, second_reader, anonymous)]
    assert all(e["prediction_request_id"] == answer["request_id"] for e in lines if e["event"] == "feedback")


def test_feedback_names_a_pacs_result_by_its_source_sop_instance_uid(model_path: Path, tmp_path: Path):
    data = sentinel_dicom()
    uid = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    with running_app(model_path, records_dir=tmp_path) as client:
        response = client.post("/v1/predict?format=dicom", content=data, headers={"Content-Type": "application/dicom"})
        assert response.status_code == 200
        feedback = client.post("/v1/feedback", json={"sop_instance_uid": uid, "tumour_present": False})
        unknown = client.post("/v1/feedback", json={"sop_instance_uid": uid + ".1", "tumour_present": False})
    assert feedback.status_code == 201, feedback.text
    assert feedback.json()["request_id"] == response.headers["x-request-id"]
    assert_problem(unknown, 404, "prediction-not-found")
    stored_bytes = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert uid.encode() not in stored_bytes  # the record keeps its hash only


def test_what_cannot_be_stored_is_a_problem(model_path: Path, tmp_path: Path):
    with running_app(model_path, records_dir=tmp_path) as client:
        answer = predict(client)
        request_id = answer["request_id"]
        image = png_bytes((160, 200), seed=3)
        batch = client.post("/v1/predict/batch", files=[("files", ("a.png", image, "image/png")),
                                                        ("files", ("b.png", image, "image/png"))])
        batch_id = batch.json()["results"][0]["result"]["request_id"]
        cases = {
            "unknown": ({"request_id": "never-answered", "label": "glioma"}, 404, "prediction-not-found"),
            "not a label": ({"request_id": request_id, "label": "banana"}, 422, "validation-error"),
            "disagree": ({"request_id": request_id, "label": "notumor", "tumour_present": True}, 422,
                         "validation-error"),
            "no finding": ({"request_id": request_id}, 422, "validation-error"),
            "both ways": ({"request_id": request_id, "sop_instance_uid": "1.2.3", "tumour_present": True}, 422,
                          "validation-error"),
            "a name": ({"request_id": request_id, "tumour_present": True, "reader_id": "Doe^Jane"}, 422,
                       "validation-error"),
            "an e-mail": ({"request_id": request_id, "tumour_present": True, "reader_id": "jane.doe@example.org"},
                          422, "validation-error"),
            "not a uid": ({"sop_instance_uid": "PatientName", "tumour_present": True}, 422, "validation-error"),
            "which image": ({"request_id": batch_id, "tumour_present": True}, 422, "validation-error"),
        }
        responses = {name: client.post("/v1/feedback", json=body) for name, (body, _, _) in cases.items()}
        not_json = client.post("/v1/feedback", content=b"{", headers={"Content-Type": "application/json"})
        one_of_batch = client.post("/v1/feedback", json={"request_id": batch_id, "item": 1, "tumour_present": True})
    for name, (_, status, slug) in cases.items():
        assert_problem(responses[name], status, slug)
    assert "several images" in responses["which image"].json()["detail"]
    assert "banana" in responses["not a label"].json()["detail"]
    assert_problem(not_json, 422, "validation-error")
    assert one_of_batch.status_code == 201 and one_of_batch.json()["item"] == 1
    assert len(stored(tmp_path)[1]) == 1


def test_feedback_with_records_off_says_it_needs_them(model_path: Path, tmp_path: Path):
    with running_app(model_path, records_dir=tmp_path, records=False) as client:
        response = client.post("/v1/feedback", json={"request_id": "r", "tumour_present": True})
    body = assert_problem(response, 409, "feedback-needs-records")
    assert "BTD_RECORDS" in body["detail"]


def test_feedback_has_its_own_api_key_scope(model_path: Path, tmp_path: Path):
    predict_key, feedback_key, both_key = new_key(), new_key(), new_key()
    keys = "\n".join([key_line("pacs", predict_key, ("predict",)), key_line("reader", feedback_key, ("feedback",)),
                      key_line("page", both_key, ("predict", "feedback"))])
    with running_app(model_path, records_dir=tmp_path, api_keys=keys) as client:
        answer = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png",
                                                                          "X-API-Key": predict_key}).json()
        body = {"request_id": answer["request_id"], "tumour_present": True}
        refused = client.post("/v1/feedback", json=body, headers={"X-API-Key": predict_key})
        no_key = client.post("/v1/feedback", json=body)
        reader_predicts = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png",
                                                                                   "X-API-Key": feedback_key})
        accepted = client.post("/v1/feedback", json=body, headers={"X-API-Key": feedback_key})
        page = client.post("/v1/feedback", json={**body, "reader_id": "r1"}, headers={"X-API-Key": both_key})
    assert "'feedback' scope" in assert_problem(refused, 403, "forbidden")["detail"]
    assert_problem(no_key, 401, "unauthorized")
    assert_problem(reader_predicts, 403, "forbidden")
    assert accepted.status_code == 201 and page.status_code == 201
