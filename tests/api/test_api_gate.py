"""The intended-use gate on POST /v1/predict: a single DICOM whose headers say a plane, sequence or
modality outside the model's validated use is not assessed, with the reason; one whose headers do
not say is assessed with a warning; GET /v1/model states the validated use."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.core.result import GATE_PHRASE
from tests.api.helpers import assert_matches_spec, dicom_testfile

AXIAL, SAGITTAL, CORONAL = [1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]
T1_POST = {"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 15, "ContrastBolusAgent": "gadolinium"}
T2 = {"ScanningSequence": "SE", "RepetitionTime": 4500, "EchoTime": 100, "ContrastBolusAgent": ""}
FLAIR = {"ScanningSequence": ["IR", "SE"], "RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500}


def slice_with(orientation=AXIAL, drop=(), **headers) -> bytes:
    """pydicom-data's 256x256 MR slice (MR2_UNCR.dcm: whole, not 64x64) with the given headers."""
    path = get_testdata_file("MR2_UNCR.dcm")
    if path is None:
        pytest.skip("MR2_UNCR.dcm is not installed (pydicom-data)")
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = orientation
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in headers.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def predict(client, data: bytes) -> dict:
    response = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    assert_matches_spec(response)
    return response.json()


def gate_warning(body: dict) -> str:
    (warning,) = [w for w in body["warnings"] if w.startswith(GATE_PHRASE)]
    return warning


def test_sagittal_dicom_is_not_assessed_with_the_plane_reason(client):
    body = predict(client, slice_with(SAGITTAL, **T1_POST))
    assert body["in_distribution"] is False and body["tumour_detected"] is None
    assert "plane" in body["ood_reasons"] and "sequence" not in body["ood_reasons"]
    assert body["acquisition"] == {"plane": "sagittal", "sequence": "t1post"}
    assert "the plane is sagittal; the model is validated on axial slices" in gate_warning(body)
    assert "not a finding" in gate_warning(body)


def test_coronal_and_oblique_dicoms_are_not_assessed(client):
    assert predict(client, slice_with(CORONAL, **FLAIR))["acquisition"] == {"plane": "coronal", "sequence": "flair"}
    oblique = predict(client, slice_with([0.569486, 0.822001, 0, 0, 0, -1], **FLAIR))  # MR2_UNCR's own plane
    assert oblique["acquisition"]["plane"] == "oblique" and "plane" in oblique["ood_reasons"]


@pytest.mark.parametrize("headers,sequence,words", [
    (T2, "t2", "T2"),
    ({**T1_POST, "ContrastBolusAgent": ""}, "t1", "T1 pre-contrast"),
    ({"ScanningSequence": ["EP", "SE"], "RepetitionTime": 6000, "EchoTime": 90}, "other", "another sequence"),
])
def test_axial_dicom_of_another_sequence_is_not_assessed_with_the_sequence_reason(client, headers, sequence, words):
    body = predict(client, slice_with(AXIAL, **headers))
    assert body["in_distribution"] is False and body["tumour_detected"] is None
    assert "sequence" in body["ood_reasons"] and "plane" not in body["ood_reasons"]
    assert body["acquisition"] == {"plane": "axial", "sequence": sequence}
    assert f"the sequence is {words}" in gate_warning(body)
    assert "validated on T1 post-contrast and FLAIR" in gate_warning(body)


@pytest.mark.parametrize("headers,sequence", [(T1_POST, "t1post"), (FLAIR, "flair")])
def test_axial_t1_post_contrast_and_flair_pass_the_gate(client, headers, sequence):
    body = predict(client, slice_with(AXIAL, **headers))
    assert body["acquisition"] == {"plane": "axial", "sequence": sequence}
    assert not {"plane", "sequence", "modality"} & set(body["ood_reasons"])
    assert not any(w.startswith(GATE_PHRASE) or "could not be checked" in w for w in body["warnings"])


def test_dicom_whose_headers_do_not_say_is_assessed_with_a_warning(client):
    body = predict(client, slice_with(AXIAL, drop=("ScanningSequence", "RepetitionTime", "EchoTime", "ProtocolName",
                                                   "SeriesDescription", "ImageOrientationPatient")))
    assert body["acquisition"] == {"plane": None, "sequence": None}
    assert not {"plane", "sequence"} & set(body["ood_reasons"])
    assert any("sequence could not be checked" in w for w in body["warnings"])
    assert any("plane could not be checked" in w for w in body["warnings"])


def test_ct_dicom_is_not_assessed_for_its_modality_and_has_no_acquisition(client):
    body = predict(client, dicom_testfile("CT_small.dcm"))
    assert body["in_distribution"] is False and body["ood_reasons"][:1] == ["modality"]
    assert body["acquisition"] is None and not any(w.startswith(GATE_PHRASE) for w in body["warnings"])


def test_png_has_no_acquisition(client):
    from tests.api.helpers import png_bytes

    response = client.post("/v1/predict", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200 and response.json()["acquisition"] is None


def test_model_description_states_the_validated_use(client):
    response = client.get("/v1/model")
    assert response.status_code == 200
    assert_matches_spec(response)
    assert response.json()["validated_for"] == {"planes": ["axial"], "sequences": ["t1post", "flair"],
                                                "specific_sequences": ["flair"]}
