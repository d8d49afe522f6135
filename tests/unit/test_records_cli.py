"""``--store``: the commands that classify in this process record their answers like the service
(btd predict, and the DICOM listener's local classifier), without patient data."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from app.core.decode import instance_uid_sha256
from app.engine.records.options import RecordOptions
from app.engine.records.store import RecordStore
from app.engine.records.writer import RecordWriter
from app.transports.cli.predict import main as predict_main
from tests.api.helpers import png_bytes
from tests.model_factory import build_model
from tests.pacs.dicom_checks import mr_slice

SENTINEL = "Sentinel^Patient"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "model.onnx")


def rows(url: str) -> list[dict]:
    with RecordStore(url) as store:
        return store.rows()


def test_btd_predict_with_a_store_records_each_local_answer(model_path: Path, tmp_path: Path, capsys):
    scans = tmp_path / "Sentinel_Patient_scans"
    scans.mkdir()
    for i in range(3):
        (scans / f"Sentinel^Patient-{i}.png").write_bytes(png_bytes((120, 100), seed=i))
    url = f"sqlite:///{tmp_path / 'db' / 'btd.db'}"
    assert predict_main(["--model", str(model_path), str(scans), "--store", url, "--no-progress"]) == 0
    records = rows(url)
    assert [r["transport"] for r in records] == ["cli"] * 3
    assert len({r["request_id"] for r in records}) == 3 and len({r["pixels_sha256"] for r in records}) == 3
    assert all(r["width"] == 100 and r["height"] == 120 and r["total_ms"] > 0 for r in records)
    stored = b"".join(p.read_bytes() for p in (tmp_path / "db").iterdir())
    assert b"Sentinel" not in stored and b"scans" not in stored  # no file names


def test_btd_predict_store_defaults_to_the_settings_database(model_path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("BTD_DATABASE_URL", raising=False)
    monkeypatch.setenv("BTD_RECORDS_DIR", str(tmp_path))
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    assert predict_main(["--model", str(model_path), str(image), "--store", "--no-progress"]) == 0
    assert len(rows(f"sqlite:///{tmp_path / 'btd.db'}")) == 1


def test_btd_predict_refuses_a_store_with_a_url(tmp_path: Path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    assert predict_main(["--url", "http://127.0.0.1:9", str(image), "--store", "--no-progress"]) == 2
    assert "records its own" in capsys.readouterr().err


def test_the_listeners_local_classifier_records_without_patient_data(model_path: Path, tmp_path: Path):
    from app.transports.pacs.processing import LocalClassifier

    ds = pydicom.dcmread(io.BytesIO(mr_slice()))
    ds.PatientName = SENTINEL
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    url = f"sqlite:///{tmp_path / 'btd.db'}"
    classifier = LocalClassifier(model_path, RecordWriter(RecordOptions(url)))
    classifier.records.start()
    try:
        assert len(classifier.classify(out.getvalue())) == 2  # the SR and the overlay
    finally:
        classifier.close()  # writes the records
    (record,) = rows(url)
    assert (record["transport"], record["modality"], record["media_type"]) == ("listener", "MR", "application/dicom")
    # Readers' feedback on the result names its source slice: the record keeps the UID's hash, not the UID.
    assert record["instance_sha256"] == instance_uid_sha256(str(ds.SOPInstanceUID))
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for text in ("Sentinel", "SENTINEL", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)):
        assert text.encode() not in stored, text
