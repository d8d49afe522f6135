"""The tumour region of a series as ONE DICOM Segmentation (series_results + segmentation): a frame per
slice with a region, each on its source's geometry, referenced by the series SR; none without a region.
A synthetic localising model (tests.model_factory) on a synthetic axial series (tests.pacs.series_data)."""

from __future__ import annotations

import io
from dataclasses import replace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import SegmentationStorage

from app.core.contract import LocalisationSpec
from app.core.series import aggregate
from app.engine.engine import Engine, EngineOptions
from app.transports.pacs.results import encode, read_source
from app.transports.pacs.segmentation import SEGMENT_LABEL
from app.transports.pacs.series_results import ClassifiedSeries, ClassifiedSlice, build_series_results
from tests.model_factory import build_model
from tests.pacs.dicom_checks import SENTINEL_NAME, dciodvfy_errors
from tests.pacs.series_data import series, synthetic_images

SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = build_model(tmp_path_factory.mktemp("m") / "m.onnx", size=64, localisation=LocalisationSpec(0.5, 0.001))
    return Engine.load_single(path, EngineOptions(tumour_threshold=0.0))  # every assessed slice: a called tumour


@pytest.fixture(scope="module")
def classified(engine) -> ClassifiedSeries:
    """Five axial slices, each with a bright disc (the model's tumour region), classified in slice order."""
    slices = sorted(series(synthetic_images(5), study_uid="1.2.826.0.1.3680043.8.498.7", name="axial"),
                    key=lambda ds: int(ds.InstanceNumber))
    out = []
    for ds in slices:
        data = encode(ds)
        out.append(ClassifiedSlice(read_source(data), None, engine.predict(data)))
    return ClassifiedSeries(out, aggregate([s.prediction for s in out]))


def _segmentations(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return [ds for ds in datasets if ds.SOPClassUID == SegmentationStorage]


def test_a_series_with_tumour_regions_gets_one_segmentation_on_its_slices(classified):
    with_region = [s for s in classified.slices if s.prediction.region is not None]
    assert classified.finding.tumour_detected and len(with_region) >= 3  # the regions the SEG holds
    objects = build_series_results(classified)
    (seg,) = _segmentations(objects)
    encoded = encode(seg)
    assert dciodvfy_errors(encoded) == []
    read = hd.seg.segread(io.BytesIO(encoded))
    assert read.SegmentationType == "BINARY" and read.get_segment_numbers() == [1]
    segment = read.get_segment_description(1)
    assert segment.segment_label == SEGMENT_LABEL
    algorithm = segment.algorithm_identification[0]
    model = classified.finding.model
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (model.name, model.version)
    # A new series of the source study; one frame per slice with a region, referencing that slice.
    first = classified.first
    assert read.StudyInstanceUID == first.StudyInstanceUID and read.SeriesInstanceUID != first.SeriesInstanceUID
    assert read.PatientName == SENTINEL_NAME  # the patient module is the source's, as the other results copy
    assert read.NumberOfFrames == len(with_region)
    assert set(read.get_source_image_uids()) == {
        (str(s.source.StudyInstanceUID), str(s.source.SeriesInstanceUID), str(s.source.SOPInstanceUID))
        for s in with_region}
    # Each frame lies on its source: position, orientation, spacing, frame of reference; its mask is the
    # disc the region was found on (the synthetic slice's bright disc, centred near the image centre).
    assert read.FrameOfReferenceUID == first.FrameOfReferenceUID
    shared = read.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in first.PixelSpacing])
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in first.ImageOrientationPatient])
    by_uid = {str(s.source.SOPInstanceUID): s.source for s in with_region}
    for frame in read.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == pytest.approx([float(v) for v in by_uid[uid].ImagePositionPatient])
    assert read.pixel_array.shape == (len(with_region), 256, 256)  # frames, rows, columns
    for mask in read.pixel_array:
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0 and abs(xs.mean() - 130) < 20 and abs(ys.mean() - 128) < 20


def test_the_series_sr_references_the_segment_and_lists_the_segmentation(classified):
    sr, *rest = build_series_results(classified)
    (seg,) = _segmentations(rest)
    assert sr.SOPClassUID == SR and dciodvfy_errors(encode(sr)) == []
    evidence = {str(item.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series_item in study.ReferencedSeriesSequence for item in series_item.ReferencedSOPSequence}
    assert str(seg.SOPInstanceUID) in evidence
    report = hd.sr.srread(io.BytesIO(encode(sr)))
    (group,) = report.content.get_volumetric_roi_measurement_groups()
    reference = group.referenced_segment
    assert str(reference.referenced_sop_instance_uid) == str(seg.SOPInstanceUID)
    assert list(reference.referenced_segment_numbers) == [1]
    assert str(reference.source_series_for_segmentation.value) == str(classified.first.SeriesInstanceUID)


def test_no_region_on_any_slice_gives_no_segmentation(classified):
    bare = [replace(s, prediction=replace(s.prediction, region=None)) for s in classified.slices]
    objects = build_series_results(ClassifiedSeries(bare, classified.finding))
    assert _segmentations(objects) == []
    report = hd.sr.srread(io.BytesIO(encode(objects[0])))
    assert report.content.get_volumetric_roi_measurement_groups() == []  # the SR references no segment


def test_a_series_without_a_tumour_finding_gets_no_segmentation(classified):
    finding = replace(classified.finding, tumour_detected=False)
    assert _segmentations(build_series_results(ClassifiedSeries(classified.slices, finding))) == []


def test_slices_off_the_first_ones_frame_of_reference_are_left_out(classified):
    moved = classified.slices[-1].source.copy()
    moved.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.99"  # another frame of reference: another grid
    slices = [*classified.slices[:-1], replace(classified.slices[-1], source=moved)]
    (seg,) = _segmentations(build_series_results(ClassifiedSeries(slices, classified.finding)))
    with_region = [s for s in slices[:-1] if s.prediction.region is not None]
    assert classified.slices[-1].prediction.region is not None and seg.NumberOfFrames == len(with_region)
    assert str(moved.SOPInstanceUID) not in str(seg.ReferencedSeriesSequence[0].to_json())


def test_the_series_comment_carries_the_key_slices_not_specific_warning(engine, classified):
    """On T1 post-contrast release 1.2.x's tumour call is not specific: every called slice carries the
    warning, and the series SR's comment says it once; a FLAIR series (specific) does not."""
    from app.core.result import NOT_SPECIFIC_PHRASE
    from app.transports.pacs.series_results import summary_text
    from tests.pacs.series_data import T1_POST

    slices = series(synthetic_images(5), study_uid="1.2.826.0.1.3680043.8.498.8", name="t1post", headers=T1_POST)
    out = [ClassifiedSlice(read_source(encode(ds)), None, engine.predict(encode(ds))) for ds in slices]
    t1post = ClassifiedSeries(out, aggregate([s.prediction for s in out]))
    assert t1post.finding.tumour_detected and all(s.prediction.acquisition.sequence == "t1post" for s in out)
    assert all(any(w.startswith(NOT_SPECIFIC_PHRASE) for w in s.prediction.warnings) for s in t1post.key)
    text = summary_text(t1post)
    assert text.count(NOT_SPECIFIC_PHRASE) == 1 and "T1 post-contrast slice" in text
    finding = replace(t1post.finding, tumour_detected=False, key_slices=[])
    assert NOT_SPECIFIC_PHRASE not in summary_text(ClassifiedSeries(t1post.slices, finding))
    assert classified.finding.tumour_detected and NOT_SPECIFIC_PHRASE not in summary_text(classified)  # FLAIR
