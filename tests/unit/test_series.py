"""The series rule (``app.core.series.aggregate``) and the slice order (``order_slices``), on
synthetic predictions and geometries; the measured figures are bench/series_rule.py's."""

from __future__ import annotations

import math

import pytest

from app.core.errors import BadRequest, PayloadTooLarge
from app.core.result import NOT_SPECIFIC_PHRASE, ModelIdentity, Prediction, Timings
from app.core.series import (
    MAX_KEY_SLICES,
    SERIES_MIN_RUN,
    SeriesResult,
    SliceGeometry,
    aggregate,
    normal_of,
    order_slices,
    plan_dicom_series,
    series_probability,
)

MODEL = ModelIdentity("m", "1", "0" * 64)
THRESHOLD = 0.5


def slice_(tumour: float | None, *, assessed: bool = True, reasons: tuple[str, ...] = ("model",),
           glioma_share: float = 1.0) -> Prediction:
    """A slice with tumour probability ``tumour`` (split glioma / meningioma by ``glioma_share``), or a
    not-assessed one."""
    t = 0.0 if tumour is None else tumour
    probabilities = {"glioma": t * glioma_share, "meningioma": t * (1 - glioma_share), "notumor": 1 - t}
    return Prediction(
        model=MODEL, label=max(probabilities, key=probabilities.get), probabilities=probabilities,
        tumour_probability=t, tumour_detected=(t >= THRESHOLD) if assessed else None, threshold=THRESHOLD, cam=None,
        timings_ms=Timings(0, 0, 0, 0, 0, 0), warnings=[], in_distribution=None if assessed else False,
        ood_reasons=[] if assessed else list(reasons))


def test_an_isolated_slice_over_the_threshold_is_not_a_tumour_series():
    finding = aggregate([slice_(p) for p in (0.1, 0.9, 0.2, 0.1)])
    assert SERIES_MIN_RUN == 2
    assert finding.assessed and finding.tumour_detected is False and finding.label == "notumor"
    assert finding.tumour_probability == pytest.approx(0.2)  # best pair (0.9, 0.2): its lowest
    assert finding.key_slices == []


def test_consecutive_slices_over_the_threshold_make_a_tumour_series():
    finding = aggregate([slice_(p) for p in (0.1, 0.6, 0.8, 0.7, 0.1)])
    assert finding.tumour_detected is True and finding.tumour_probability == pytest.approx(0.7)
    assert finding.key_slices == [1, 2, 3]  # the whole stretch over the threshold holding the best pair
    assert finding.tumour_detected == (finding.tumour_probability >= finding.threshold)


def test_not_assessed_slices_are_skipped_not_counted_as_tumour_free():
    slices = [slice_(0.9), slice_(None, assessed=False, reasons=("model", "no-head")), slice_(0.8), slice_(0.1)]
    finding = aggregate(slices)
    assert finding.tumour_detected is True and finding.key_slices == [0, 2]  # indices in the series
    assert (finding.slices_assessed, finding.slices_not_assessed) == (3, 1)
    assert finding.not_assessed_reasons == {"model": 1, "no-head": 1}


def test_a_series_without_an_assessed_slice_is_not_assessed():
    finding = aggregate([slice_(None, assessed=False, reasons=("plane",)), slice_(None, assessed=False)])
    assert not finding.assessed and finding.tumour_detected is None and finding.label is None
    assert finding.tumour_probability is None and finding.not_assessed_reasons == {"model": 1, "plane": 1}


def test_a_single_slice_series_is_judged_as_its_slice():
    assert aggregate([slice_(0.7)]).tumour_detected is True
    assert aggregate([slice_(0.3)]).tumour_detected is False


def test_label_is_the_probability_weighted_vote_over_tumour_slices():
    # the class probabilities are summed over the tumour slices (the tumour-free last one has no vote)
    slices = [slice_(0.95, glioma_share=0.9), slice_(0.6, glioma_share=0.2), slice_(0.6, glioma_share=0.2),
              slice_(0.1, glioma_share=0.0)]
    finding = aggregate(slices)
    # glioma: 0.855 + 0.12 + 0.12 = 1.095; meningioma: 0.095 + 0.48 + 0.48 = 1.055
    assert finding.label == "glioma"
    slices[0] = slice_(0.95, glioma_share=0.7)  # glioma 0.905, meningioma 1.245
    assert aggregate(slices).label == "meningioma"


def test_key_slices_are_the_most_probable_of_a_long_stretch_in_slice_order():
    finding = aggregate([slice_(0.6 + 0.03 * i) for i in range(9)])
    assert len(finding.key_slices) == MAX_KEY_SLICES and finding.key_slices == [4, 5, 6, 7, 8]


def test_min_run_one_is_the_maximum_and_longer_runs_are_stricter():
    probs = [0.2, 0.9, 0.6, 0.4]
    assert series_probability(probs, 1) == (0.9, 1)
    assert series_probability(probs, 2) == (0.6, 1)
    assert series_probability(probs, 3) == (0.4, 1)
    assert series_probability([0.3], 3) == (0.3, 0)
    assert aggregate([slice_(p) for p in probs], min_run=3).tumour_detected is False


def test_an_empty_series_is_refused():
    with pytest.raises(ValueError):
        aggregate([])


# ---------------------------------------------------------------- ordering

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_slices_are_ordered_along_the_normal_even_when_oblique():
    tilt = math.radians(20)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))
    n = normal_of(orientation)
    assert n is not None and n[2] == pytest.approx(math.cos(tilt))
    # positions 0, 5, 10 mm along the normal, received shuffled, instance numbers contradicting them
    slices = [SliceGeometry(f"1.{k}", None, 10 - k, tuple(k * 5 * v for v in n), n) for k in (2, 0, 1)]
    order, positions, ordering = order_slices(slices)
    assert ordering == "position" and order == [1, 2, 0]
    assert [round(positions[i], 6) for i in order] == [0.0, 5.0, 10.0]


def test_without_positions_the_order_falls_back_to_instance_number_then_received():
    n = normal_of(AXIAL)
    slices = [SliceGeometry("a", None, 3, (0, 0, 1), n), SliceGeometry("b", None, 1, None, n),
              SliceGeometry("c", None, 2, (0, 0, 3), n)]
    order, _, ordering = order_slices(slices)
    assert ordering == "instance-number" and order == [1, 2, 0]
    slices[1] = SliceGeometry("b", None, None, None, n)
    assert order_slices(slices) == ([0, 1, 2], [1.0, None, 3.0], "received")


def test_mixed_orientations_are_not_ordered_by_position():
    sagittal = normal_of((0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    slices = [SliceGeometry("a", None, 2, (0, 0, 1), normal_of(AXIAL)), SliceGeometry("b", None, 1, (0, 0, 0), sagittal)]
    assert order_slices(slices)[2] == "instance-number"


def test_the_frames_of_a_multiframe_instance_are_slices_of_the_plan():
    n = normal_of(AXIAL)
    enhanced = [SliceGeometry("1.9", f, 1, (0.0, 0.0, 10.0 - 4 * f), n) for f in (1, 2, 3)]
    plan, ordering = plan_dicom_series([("s", enhanced), ("s", [SliceGeometry("1.8", None, 2, (0, 0, 20.0), n)])], 10)
    assert ordering == "position"
    assert [(i, g.frame_number, pos) for i, g, pos in plan] == [(0, 3, -2.0), (0, 2, 2.0), (0, 1, 6.0), (1, None, 20.0)]


def test_a_plan_refuses_mixed_series_no_instance_and_too_many_slices():
    g = SliceGeometry("1", None, 1, (0, 0, 0), normal_of(AXIAL))
    with pytest.raises(BadRequest, match="2 series"):
        plan_dicom_series([("a", [g]), ("b", [g])], 10)
    with pytest.raises(BadRequest):
        plan_dicom_series([], 10)
    with pytest.raises(BadRequest, match="no Series Instance UID"):
        plan_dicom_series([("", [g])], 10)
    with pytest.raises(PayloadTooLarge):
        plan_dicom_series([("a", [g, g, g])], 2)


def test_a_tumour_series_carries_its_key_slices_not_specific_warning_once():
    said = NOT_SPECIFIC_PHRASE + " T1 post-contrast slice, where ..."
    slices = [slice_(p) for p in (0.1, 0.8, 0.9, 0.1)]
    for s in slices:
        if s.tumour_detected:
            s.warnings.append(said)

    def build(predictions):
        return SeriesResult.build("dicom", "position", [(float(i), f"1.2.{i}", None, p)
                                                        for i, p in enumerate(predictions)])

    tumour = build(slices)
    assert tumour.finding.tumour_detected is True and tumour.warnings == [said]
    no_tumour = build([slice_(0.1), slices[1], slice_(0.2), slice_(0.1)])  # one slice called: not a tumour series
    assert no_tumour.finding.tumour_detected is False and no_tumour.warnings == []
