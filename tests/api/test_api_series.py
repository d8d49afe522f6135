"""POST /v1/predict/series: DICOM instances (multipart/related, as STOW-RS sends) or a NIfTI volume."""

from __future__ import annotations

import gzip
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from app.core.contract import LocalisationSpec
from app.transports.pacs.multipart import DICOM, decode_related, encode_related
from app.transports.pacs.results import encode, result_uid
from tests.api.helpers import assert_matches_spec, assert_problem, png_bytes, running_app
from tests.model_factory import build_model
from tests.pacs.dicom_checks import SENTINEL_NAME, dciodvfy_errors
from tests.pacs.series_data import series, synthetic_images

nib = pytest.importorskip("nibabel")
SERIES = "/v1/predict/series"
SERIES_UID = generate_uid()
STUDY_UID = result_uid("api series study")
SR_CLASS, KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.59"
SC_CLASS, SEG_CLASS = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.4"


def mr(z: float, number: int, *, series_uid: str = SERIES_UID) -> tuple[bytes, str]:
    """pydicom's 64x64 MR slice at height ``z`` (axial), as (bytes, SOP Instance UID)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    uid = generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID = series_uid, uid, uid
    ds.InstanceNumber, ds.ImageOrientationPatient, ds.ImagePositionPatient = number, [1, 0, 0, 0, 1, 0], [0, 0, z]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), uid


def enhanced_mr(heights: list[float]) -> tuple[bytes, str]:
    """A multi-frame MR whose frames lie at ``heights`` (Plane Position Sequence per frame, Plane
    Orientation shared), as an Enhanced MR object places them."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    frames = len(heights)
    ds.PixelData = b"".join(ds.PixelData for _ in range(frames))
    ds.NumberOfFrames = frames
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        delattr(ds, keyword)
    shared, orientation = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for z in heights:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    uid = generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID = SERIES_UID, uid, uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), uid


def post_dicom(client, parts: list[bytes], headers: dict | None = None, **kwargs):
    body, content_type = encode_related(parts)
    return client.post(SERIES, content=body, headers={"Content-Type": content_type, **(headers or {})}, **kwargs)


def nifti(shape=(64, 64, 5), *, compress: bool = True) -> bytes:
    data = np.random.default_rng(0).integers(0, 1000, shape).astype(np.int16)
    raw = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])).to_bytes()
    return gzip.compress(raw) if compress else raw


def test_dicom_instances_are_ordered_along_the_normal_and_aggregated(client):
    received = [mr(10.0, 1), mr(-5.0, 3), mr(2.5, 2)]  # instance numbers contradict the positions
    response = post_dicom(client, [data for data, _ in received])
    assert response.status_code == 200, response.text
    assert_matches_spec(response)
    body = response.json()
    assert body["source"] == "dicom" and body["ordering"] == "position"
    assert [s["instance_uid"] for s in body["slices"]] == [received[i][1] for i in (1, 2, 0)]
    assert [s["position"] for s in body["slices"]] == [-5.0, 2.5, 10.0]
    assert [s["index"] for s in body["slices"]] == [0, 1, 2]
    finding = body["finding"]
    assert finding["slices_assessed"] + finding["slices_not_assessed"] == 3
    assert finding["threshold"] == body["slices"][0]["result"]["threshold"]
    assert finding["rule"] and body["request_id"] == response.headers["x-request-id"]


def test_the_frames_of_an_enhanced_mr_are_slices(client):
    data, uid = enhanced_mr([8.0, 0.0, 4.0])
    body = post_dicom(client, [data]).json()
    assert [(s["instance_uid"], s["frame_number"], s["position"]) for s in body["slices"]] == [
        (uid, 2, 0.0), (uid, 3, 4.0), (uid, 1, 8.0)]
    assert body["warnings"] == []
    assert not any("multi-frame" in w for s in body["slices"] for w in s["result"]["warnings"])


def test_a_nifti_volume_answers_its_axial_slices(client):
    for body_bytes, content_type in ((nifti(), "application/gzip"), (nifti(compress=False), "application/octet-stream")):
        response = client.post(SERIES, content=body_bytes, headers={"Content-Type": content_type})
        assert response.status_code == 200, response.text
        assert_matches_spec(response)
        body = response.json()
        assert body["source"] == "nifti" and len(body["slices"]) == 5
        assert [s["position"] for s in body["slices"]] == [0.0, 2.5, 5.0, 7.5, 10.0]
        assert all(s["instance_uid"] is None for s in body["slices"])


def test_instances_without_positions_are_ordered_by_instance_number_and_say_so(client):
    received = [mr(0.0, 2), mr(0.0, 1)]
    parts = []
    for data, _ in received:
        ds = pydicom.dcmread(io.BytesIO(data))
        del ds.ImagePositionPatient
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        parts.append(buffer.getvalue())
    body = post_dicom(client, parts).json()
    assert body["ordering"] == "instance-number" and "Instance Number" in body["warnings"][0]
    assert [s["instance_uid"] for s in body["slices"]] == [received[1][1], received[0][1]]
    assert [s["position"] for s in body["slices"]] == [None, None]


def test_instances_of_two_series_are_refused(client):
    response = post_dicom(client, [mr(0.0, 1)[0], mr(5.0, 2, series_uid=generate_uid())[0]])
    assert "2 series" in assert_problem(response, 400, "bad-request")["detail"]


@pytest.mark.parametrize("shape, words", [((64, 64, 5, 3), "4-D"), ((64, 64), "2-D")])
def test_a_nifti_that_is_not_one_volume_is_refused(client, shape, words):
    response = client.post(SERIES, content=nifti(shape), headers={"Content-Type": "application/gzip"})
    assert words in assert_problem(response, 400, "invalid-image")["detail"]


def test_bad_bodies_are_4xx_problems(client):
    assert_problem(client.post(SERIES, content=png_bytes(), headers={"Content-Type": "application/octet-stream"}),
                   415, "unsupported-media-type")
    assert_problem(client.post(SERIES, content=b"", headers={"Content-Type": "application/octet-stream"}),
                   400, "bad-request")
    assert_problem(client.post(SERIES, content=png_bytes(), headers={"Content-Type": "image/png"}),
                   415, "unsupported-media-type")
    empty = b"--b--\r\n"
    assert_problem(client.post(SERIES, content=empty, headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}),
                   400, "bad-request")
    body, content_type = encode_related([png_bytes()], part_type="image/png")
    assert_problem(client.post(SERIES, content=body, headers={"Content-Type": content_type}), 415,
                   "unsupported-media-type")
    body, content_type = encode_related([png_bytes()])  # said to be DICOM, is not
    assert_problem(client.post(SERIES, content=body, headers={"Content-Type": content_type}), 415,
                   "unsupported-media-type")


def axial_series(count: int = 5) -> list[bytes]:
    """A synthetic axial FLAIR series (in the intended use: assessed) with a bright disc on each slice."""
    return [encode(ds) for ds in series(synthetic_images(count, 128), study_uid=STUDY_UID, name="api axial")]


def dicom_parts(response) -> list[pydicom.Dataset]:
    assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    parts = decode_related(response.content, response.headers["content-type"])
    assert [t for t, _ in parts] == [DICOM] * len(parts)
    return [pydicom.dcmread(io.BytesIO(p)) for _, p in parts]


def test_format_dicom_answers_the_series_result_objects(client):
    sent = axial_series()
    response = post_dicom(client, sent, params={"format": "dicom"})
    assert response.status_code == 200, response.text
    assert_matches_spec(response)
    objects = dicom_parts(response)
    assert all(dciodvfy_errors(encode(ds)) == [] for ds in objects)
    sr, kos, *overlays = objects
    sources = {str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in sent}
    assert (sr.SOPClassUID, kos.SOPClassUID) == (SR_CLASS, KOS_CLASS) and {o.SOPClassUID for o in overlays} == {SC_CLASS}
    assert {ds.StudyInstanceUID for ds in objects} == {STUDY_UID} and sr.PatientName == SENTINEL_NAME
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in evidence} == sources  # every slice of the series
    # The KOS flags the JSON answer's key slices; each has its overlay. No Segmentation: the model has no map.
    finding = post_dicom(client, sent).json()["finding"]
    key = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in kos.ContentSequence if i.ValueType == "IMAGE"}
    assert len(key) == len(finding["key_slices"]) >= 1 and key <= sources
    assert {str(o.SourceImageSequence[0].ReferencedSOPInstanceUID) for o in overlays} == key
    # Accept: application/dicom: the same SR alone.
    alone = post_dicom(client, sent, headers={"Accept": DICOM})
    assert alone.status_code == 200 and alone.headers["content-type"] == DICOM
    assert pydicom.dcmread(io.BytesIO(alone.content)).SOPInstanceUID == sr.SOPInstanceUID


def test_a_localising_model_adds_one_segmentation_of_the_tumour_region(tmp_path):
    model = build_model(tmp_path / "localising.onnx", size=64, localisation=LocalisationSpec(0.5, 0.001))
    sent = axial_series()
    with running_app(model, tumour_threshold=0.0) as client:  # every assessed slice: a called tumour
        objects = dicom_parts(post_dicom(client, sent, params={"format": "dicom"}))
    (seg,) = [ds for ds in objects if ds.SOPClassUID == SEG_CLASS]
    assert objects[0].SOPClassUID == SR_CLASS and dciodvfy_errors(encode(seg)) == []
    read = hd.seg.segread(io.BytesIO(encode(seg)))
    sources = {str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in sent}
    frames = {uid for _, _, uid in read.get_source_image_uids()}
    assert read.NumberOfFrames == len(frames) >= 1 and frames <= sources and read.StudyInstanceUID == STUDY_UID


def test_dicom_results_of_a_nifti_volume_are_406(client):
    response = client.post(SERIES, params={"format": "dicom"}, content=nifti(),
                           headers={"Content-Type": "application/gzip"})
    assert "NIfTI volume" in assert_problem(response, 406, "not-acceptable")["detail"]


def test_limits_on_slices_and_inflated_volume(model_path):
    with running_app(model_path, max_series_slices=2, max_volume_bytes=1 << 20) as client:
        response = post_dicom(client, [mr(float(z), z)[0] for z in range(3)])
        assert "BTD_MAX_SERIES_SLICES" in assert_problem(response, 413, "payload-too-large")["detail"]
        many, content_type = encode_related([b"x"] * 100_000)  # refused before it is split into parts
        response = client.post(SERIES, content=many, headers={"Content-Type": content_type})
        assert "more than 2 parts" in assert_problem(response, 413, "payload-too-large")["detail"]
        bomb = gzip.compress(b"\0" * (2 << 20))
        response = client.post(SERIES, content=bomb, headers={"Content-Type": "application/gzip"})
        assert "inflates" in assert_problem(response, 413, "payload-too-large")["detail"]


def test_cam_png_gives_each_slice_its_images(client):
    response = post_dicom(client, [mr(0.0, 1)[0], mr(5.0, 2)[0]], params={"cam": "png"})
    assert response.status_code == 200, response.text
    assert_matches_spec(response)
    cams = [s["result"]["cam"] for s in response.json()["slices"]]
    assert all(c is not None and c["format"] == "png" and (c["width"], c["height"]) == (64, 64) for c in cams)
    assert all(s["result"]["cam"] is None for s in post_dicom(client, [mr(0.0, 1)[0]]).json()["slices"])


def test_cam_png_past_its_slice_limit_answers_without_images_and_says_so(model_path):
    with running_app(model_path, max_series_cam_slices=2) as client:
        body = post_dicom(client, [mr(0.0, 1)[0], mr(5.0, 2)[0]], params={"cam": "png"}).json()
        assert all(s["result"]["cam"]["format"] == "png" for s in body["slices"]) and body["warnings"] == []
        response = client.post(SERIES, params={"cam": "png"}, content=nifti(),
                               headers={"Content-Type": "application/gzip"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert all(s["result"]["cam"] is None for s in body["slices"])
        assert any("BTD_MAX_SERIES_CAM_SLICES" in w and "5 slices" in w for w in body["warnings"])
