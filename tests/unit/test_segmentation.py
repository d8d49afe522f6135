"""The tumour region as a DICOM Segmentation (app.transports.pacs.segmentation) and outlined on the CAM
overlay (app.transports.pacs.results): the source's frame geometry, read back by highdicom, dciodvfy."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pytest

from app.core.contract import LocalisationSpec
from app.core.result import Prediction
from app.engine.engine import Engine, EngineOptions
from app.transports.pacs.results import build_results, encode, read_source
from app.transports.pacs.segmentation import SEGMENT_LABEL, build_segmentation, region_mask
from tests.model_factory import build_model
from tests.pacs.dicom_checks import AXIAL_T1_POST, SENTINEL_ID, SENTINEL_NAME, dciodvfy_errors, mr_slice, read

# A rectangle in the source's pixels (MR2_UNCR.dcm is 1024 x 1024), and a triangle beside it.
RECTANGLE = [[300.0, 200.0], [300.0, 400.0], [500.0, 400.0], [500.0, 200.0]]
TRIANGLE = [[700.0, 700.0], [800.0, 700.0], [750.0, 780.0]]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Engine:
    path = build_model(tmp_path_factory.mktemp("m") / "m.onnx", size=64, localisation=LocalisationSpec(0.5, 0.001))
    return Engine.load_single(path, EngineOptions(tumour_threshold=0.0))  # every assessed slice: a called tumour


@pytest.fixture(scope="module")
def slice_and_result(predictor) -> tuple[bytes, Prediction]:
    """An axial T1 post-contrast slice and its prediction, its region replaced by a known one."""
    data = mr_slice("MR2_UNCR.dcm", headers=AXIAL_T1_POST)
    result = predictor.predict(data, cam="png").to_dict()
    assert result["region"] is not None  # the model's own region: replaced below by shapes a test can check
    result["region"] |= {"contours": [RECTANGLE, TRIANGLE],
                         "box": {"x": 300, "y": 200, "width": 501, "height": 581}}
    return data, Prediction.from_dict(result)


def test_the_segmentation_lies_on_the_source_frame_and_reads_back(slice_and_result):
    data, result = slice_and_result
    source = read(data)
    encoded = encode(build_segmentation(read_source(data), result))
    assert dciodvfy_errors(encoded) == []
    seg = hd.seg.segread(io.BytesIO(encoded))
    assert seg.SegmentationType == "BINARY" and seg.get_segment_numbers() == [1]
    segment = seg.get_segment_description(1)
    assert segment.segment_label == SEGMENT_LABEL and segment.algorithm_type.value == "AUTOMATIC"
    algorithm = segment.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (result.model.name, result.model.version)
    assert f"sha256={result.model.sha256}" in algorithm.AlgorithmParameters
    # The frame geometry is the source's: size, pixel spacing, position, orientation, frame of reference.
    assert (seg.Rows, seg.Columns, seg.NumberOfFrames) == (source.Rows, source.Columns, 1)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in source.PixelSpacing])
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in source.ImageOrientationPatient])
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
        [float(v) for v in source.ImagePositionPatient])
    assert seg.get_source_image_uids()[0][2] == source.SOPInstanceUID
    # Its pixels: the region's polygons filled, in the source's pixels.
    mask = seg.get_pixels_by_source_instance([source.SOPInstanceUID])[0, :, :, 0]
    assert mask.shape == (source.Rows, source.Columns)
    assert mask[300, 400] == 1 and mask[200, 300] == 1 and mask[400, 500] == 1 and mask[199, 400] == 0
    assert mask[720, 750] == 1 and mask[650, 750] == 0
    assert mask.sum() == pytest.approx(201 * 201 + 0.5 * 100 * 80, rel=0.03)
    np.testing.assert_array_equal(mask, region_mask(result.region, source.Rows, source.Columns))
    # The source's patient and study; a new series in its study.
    assert (seg.PatientName, seg.PatientID, seg.StudyInstanceUID) == (SENTINEL_NAME, SENTINEL_ID,
                                                                       source.StudyInstanceUID)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID


def test_the_same_slice_and_model_give_the_same_segmentation_uids(slice_and_result):
    data, result = slice_and_result
    first, second = (build_segmentation(read_source(data), result) for _ in range(2))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)


def test_no_region_no_segmentation(slice_and_result):
    data, result = slice_and_result
    from dataclasses import replace

    assert build_segmentation(read_source(data), replace(result, region=None)) is None


def test_the_overlay_outlines_the_region(slice_and_result):
    data, result = slice_and_result
    from dataclasses import replace

    def green(r: Prediction) -> np.ndarray:
        sc = read(encode(build_results(read_source(data), r)[1]))
        pixels = sc.pixel_array[: sc.Columns]  # the square picture above the caption band
        return (pixels[:, :, 1] > 200) & (pixels[:, :, 0] < 80) & (pixels[:, :, 2] < 80)

    with_region, without = green(result), green(replace(result, region=None))
    outline = with_region & ~without
    scale = outline.shape[1] / 1024  # the overlay's pixels per source pixel
    rows, cols = np.nonzero(outline)
    assert len(rows) > 100
    # The rectangle's edges, scaled: its left edge x = 300 and top edge y = 200 in the source.
    assert np.abs(cols.min() - 300 * scale) <= 3 and np.abs(rows.min() - 200 * scale) <= 3
    assert np.abs(cols.max() - 800 * scale) <= 3 and np.abs(rows.max() - 780 * scale) <= 3
