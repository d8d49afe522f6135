"""DICOM results (app.transports.pacs.results): what the SR and the CAM overlay say, what they reference, that
dciodvfy accepts them and pydicom reads them back."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset

from app.core.errors import InvalidImage
from app.core.result import Prediction
from app.engine.engine import Engine
from app.transports.pacs.multipart import decode_related, encode_related
from app.transports.pacs.processing import sr_summary
from app.transports.pacs.results import build_results, encode, patient_orientation, read_source
from tests.model_factory import build_model
from tests.pacs.dicom_checks import AXIAL_T1_POST, SENTINEL_ID, SENTINEL_NAME, dciodvfy_errors, mr_slice, read


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Engine:
    return Engine.load_single(build_model(tmp_path_factory.mktemp("m") / "m.onnx"))


@pytest.fixture(scope="module")
def slice_and_result(predictor):
    """A whole slice the model is validated for (MR_small.dcm, 64x64 and T2, is not assessed: no finding
    to report; MR2_UNCR.dcm is oblique T1 pre-contrast: its headers are made axial T1 post-contrast)."""
    data = mr_slice("MR2_UNCR.dcm", headers=AXIAL_T1_POST)
    return data, predictor.predict(data, cam="png").to_dict()


def test_a_slice_too_small_to_be_whole_gives_no_reportable_finding(predictor):
    result = predictor.predict(mr_slice("MR_small.dcm"), cam="png").to_dict()
    assert result["in_distribution"] is False and not Prediction.from_dict(result).assessed


def _items(ds: Dataset) -> list[Dataset]:
    out, stack = [], list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        out.append(item)
        stack.extend(item.get("ContentSequence", []))
    return out


def _nums(sr: Dataset) -> dict[str, float]:
    return {i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
            for i in _items(sr) if i.ValueType == "NUM"}


def _texts(sr: Dataset) -> list[str]:
    return [str(i.TextValue) for i in _items(sr) if i.ValueType == "TEXT"]


def test_results_reference_the_source_and_copy_patient_and_study(slice_and_result):
    data, result = slice_and_result
    source = read(data)
    sr_bytes, sc_bytes = (encode(ds) for ds in build_results(read_source(data), Prediction.from_dict(result)))
    sr, sc = read(sr_bytes), read(sc_bytes)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"  # Comprehensive SR
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert (ds.PatientName, ds.PatientID) == (SENTINEL_NAME, SENTINEL_ID)
        assert ds.SOPInstanceUID != source.SOPInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    images = [i for i in _items(sr) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [source.SOPInstanceUID]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_sr_holds_finding_probabilities_decision_model_and_wording(slice_and_result):
    data, result = slice_and_result
    sr = build_results(read_source(data), Prediction.from_dict(result))[0]
    nums = _nums(sr)
    for label, p in result["probabilities"].items():
        assert nums[f"Probability of {label}"] == pytest.approx(p, abs=1e-6)
    assert nums["Tumour probability (1 - p(notumor))"] == pytest.approx(result["tumour_probability"], abs=1e-6)
    assert nums["Tumour decision threshold"] == pytest.approx(result["threshold"])
    assert sr_summary(sr) == (result["label"], result["tumour_detected"])
    texts = _texts(sr)
    model = result["model"]
    assert model["name"] in texts and model["version"] in texts
    assert f"sha256={model['sha256']}" in texts
    assert any("not a diagnosis" in t for t in texts)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR2_UNCR.dcm"])  # axial; oblique (orientation "PL")
def test_results_pass_dciodvfy_and_read_back(predictor, name):
    data = mr_slice(name)
    result = predictor.predict(data, cam="png").to_dict()
    for ds in build_results(read_source(data), Prediction.from_dict(result)):
        encoded = encode(ds)
        assert dciodvfy_errors(encoded) == [], ds.SOPClassUID.name
        back = read(encoded)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
    sc = read(encode(build_results(read_source(data), Prediction.from_dict(result))[1]))
    assert list(sc.PatientOrientation) == list(patient_orientation(read(data)))
    pixels = sc.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and max(pixels.shape[:2]) >= 512  # legible caption
    assert "not a diagnosis" in str(sc.ImageComments)


def _codes(sr: Dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in _items(sr):
        if item.ValueType == "CODE":
            out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(
                item.ConceptCodeSequence[0].CodeValue)
    return out


def test_sr_states_the_plane_and_sequence_the_headers_say(slice_and_result):
    data, result = slice_and_result
    assert result["acquisition"] == {"plane": "axial", "sequence": "t1post"}
    sr = build_results(read_source(data), Prediction.from_dict(result))[0]
    codes = _codes(sr)
    assert codes["Image plane, from the source's headers"] == ["AXIAL"]
    assert codes["MR sequence, from the source's headers"] == ["T1POST"]
    assert "Not assessed because" not in codes


@pytest.mark.parametrize("headers,reasons,words", [
    ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1], "ContrastBolusAgent": "gadolinium"}, ["PLANE"],
     "the plane is sagittal"),
    ({"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "RepetitionTime": 4500, "EchoTime": 100}, ["SEQUENCE"],
     "the sequence is T2"),
])
def test_sr_of_a_slice_outside_the_validated_use_says_why_and_reports_no_finding(predictor, headers, reasons, words):
    data = mr_slice("MR2_UNCR.dcm", headers=headers)
    result = predictor.predict(data, cam="png")
    assert not result.assessed and [r.upper() for r in result.ood_reasons if r in ("plane", "sequence")] == reasons
    sr, sc = build_results(read_source(data), result)
    codes = _codes(sr)
    assert set(reasons) <= set(codes["Not assessed because"])
    assert not any(name.startswith("Probability of") for name in _nums(sr))
    assert sr_summary(sr) == ("No finding: input not assessed", None)
    assert any(words in t and "outside the model's validated use" in t and "no finding" in t for t in _texts(sr))
    assert "no finding" in str(sc.ImageComments)
    assert dciodvfy_errors(encode(sr)) == [] and dciodvfy_errors(encode(sc)) == []


def test_uids_are_derived_so_a_resend_replaces(slice_and_result):
    data, result = slice_and_result
    finding = Prediction.from_dict(result)
    first = [ds.SOPInstanceUID for ds in build_results(read_source(data), finding)]
    again = [ds.SOPInstanceUID for ds in build_results(read_source(data), finding)]
    other = dict(result, threshold=0.3)
    moved = [ds.SOPInstanceUID for ds in build_results(read_source(data), Prediction.from_dict(other))]
    assert first == again and not set(first) & set(moved)


def test_out_of_distribution_sr_reports_no_finding():
    overlay = base64.b64encode(cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))[1].tobytes()).decode()
    finding = Prediction.from_dict({
        "model": {"name": "btd-resnet50", "version": "1.2.0", "sha256": "a" * 64}, "label": "glioma",
        "probabilities": {"glioma": 0.7, "meningioma": 0.1, "notumor": 0.1, "pituitary": 0.1},
        "tumour_probability": 0.9, "tumour_detected": None, "threshold": 0.5,
        "cam": {"format": "png", "label": "glioma", "width": 64, "height": 64, "image_png": overlay,
                "heatmap_png": overlay, "overlay_png": overlay, "box": {"x": 0, "y": 0, "width": 64, "height": 64}},
        "timings_ms": {"decode": 0, "preprocess": 0, "queue": 0, "inference": 0, "cam": 0, "total": 0},
        "warnings": [], "in_distribution": False, "ood_score": 41.5, "ood_threshold": 30.0, "ood_reasons": ["model"]})
    data = mr_slice()
    sr, sc = build_results(read_source(data), finding)
    nums, texts = _nums(sr), _texts(sr)
    assert not any(name.startswith("Probability of") for name in nums)
    assert "Tumour probability (1 - p(notumor))" not in nums
    assert nums["Out-of-distribution score"] == pytest.approx(41.5)
    assert nums["Out-of-distribution threshold"] == pytest.approx(30.0)
    assert sr_summary(sr) == ("No finding: input not assessed", None)
    assert any("unlike the model's training data" in t and "no finding" in t for t in texts)
    assert "no finding" in str(sc.ImageComments)
    assert dciodvfy_errors(encode(sr)) == []


def test_source_without_uids_is_refused_without_quoting_it():
    ds = read(mr_slice())
    del ds.SOPInstanceUID
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(InvalidImage) as error:
        read_source(buffer.getvalue())
    assert "SOPInstanceUID" in error.value.detail and SENTINEL_NAME not in error.value.detail


@pytest.mark.parametrize(("cosines", "expected"), [
    ([1, 0, 0, 0, 1, 0], ("L", "P")),  # axial
    ([0, 1, 0, 0, 0, -1], ("P", "F")),  # sagittal
    ([0.57, 0.82, 0, 0, 0, -1], ("PL", "F")),  # oblique: main axis first
])
def test_patient_orientation_from_image_orientation(cosines, expected):
    ds = Dataset()
    ds.ImageOrientationPatient = cosines
    assert patient_orientation(ds) == expected
    assert patient_orientation(Dataset()) is None


def test_multipart_related_round_trip():
    parts = [b"\x00\r\n--not-a-boundary\r\n" * 3, bytes(range(256))]
    body, content_type = encode_related(parts)
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    assert [p for _, p in decode_related(body, content_type)] == parts
    with pytest.raises(ValueError):
        decode_related(body, "application/dicom")


def test_the_sr_comment_says_where_a_tumour_call_is_not_specific(slice_and_result):
    """The warning of a tumour called on a sequence where the tumour call is not specific (T1
    post-contrast for 1.2.x) reaches the PACS in the SR's comment; other warnings do not."""
    from app.core.result import NOT_SPECIFIC_PHRASE

    data, result = slice_and_result
    said = NOT_SPECIFIC_PHRASE + " T1 post-contrast slice, where the model is validated for a tumour's type"
    called = {**result, "tumour_detected": True, "warnings": ["another warning", said]}
    assert any(said in t for t in _texts(build_results(read_source(data), Prediction.from_dict(called))[0]))
    plain = {**result, "tumour_detected": True, "warnings": ["another warning"]}
    assert not any(NOT_SPECIFIC_PHRASE in t for t in _texts(build_results(read_source(data),
                                                                            Prediction.from_dict(plain))[0]))
