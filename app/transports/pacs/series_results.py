"""DICOM result objects for one classified series (series mode), each in a new series of the source's
study, built with highdicom:

- ONE **Comprehensive SR** (TID 1500 *Imaging Measurement Report*): a first measurement group with the
  series finding (most likely class, tumour present or absent, series tumour probability, threshold,
  slices assessed and not assessed with each reason, the aggregation rule, the key slices as its
  source images), then one compact group per slice (its class probabilities, or why it was not
  assessed), the model as algorithm (TID 4019) and observing device;
- ONE **Key Object Selection** document ("Of Interest") flagging the key slices;
- a CAM overlay **Secondary Capture** for each key slice only (``results.build_overlay``);
- ONE **Segmentation** (``segmentation``) of the tumour region, when the model localises and the series
  finding is a tumour: a frame per slice with a region (single-frame sources), each on its source's
  geometry; the SR references its segment (a TID 1411 volumetric group) and lists it as evidence.

A series with no assessed slice gets the SR alone, saying not assessed and why. UIDs derive from the
source series' UID, the model's sha256 and the threshold (a retried send replaces, never duplicates).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from app.core.result import Prediction
from app.core.series import ORDERING_WARNINGS, Ordering, SeriesFinding
from app.transports.pacs.results import (
    DISCLAIMER,
    LOCAL_SCHEME_ITEM,
    MANUFACTURER,
    NO_FINDING,
    NO_UNITS,
    NOT_ASSESSED_BECAUSE,
    OOD_SCORE,
    REASONS,
    SERIES_DESCRIPTION,
    TUMOUR,
    TUMOUR_PROBABILITY,
    TUMOUR_THRESHOLD,
    _local,
    _probability_code,
    algorithm_of,
    build_overlay,
    class_code,
    device_observer,
    evidence_copy,
    not_specific_words,
    procedure_of,
    result_uid,
    source_image,
)
from app.transports.pacs.segmentation import SEGMENT_LABEL, SEGMENT_NUMBER, on_its_frame, segmentation_of

SERIES_SR_SERIES_NUMBER = 9911
KOS_SERIES_NUMBER = 9912
KEY_OVERLAY_SERIES_NUMBER = 9913
UNREADABLE = "unreadable"  # a slice that could not be read or classified: not assessed for this reason
SERIES_REASONS = {**REASONS, UNREADABLE: "Slice could not be read"}
SLICES_ASSESSED = _local("SLICES-ASSESSED", "Slices assessed")
SLICES_NOT_ASSESSED = _local("SLICES-NOT-ASSESS", "Slices not assessed")
SERIES_FINDING = "btd classification of one series"


@dataclass
class ClassifiedSlice:
    """One slice of the series: its source's header (``dicom_read.results_header``: patient data),
    the frame of a multi-frame source (0-based; None: single frame), its prediction and, for a key
    slice, its prediction with the CAM images."""

    source: Dataset
    frame: int | None
    prediction: Prediction
    overlay: Prediction | None = None
    sr_item: Dataset | None = None  # its SR content item (``slice_item``), built once


@dataclass
class ClassifiedSeries:
    """A series' slices in slice order and its finding (its key slices index ``slices``)."""

    slices: list[ClassifiedSlice]
    finding: SeriesFinding
    unread: int = 0  # slices that could not be read (not in ``slices``: no header to reference)
    ordering: Ordering = "position"  # how the slices were ordered (app.core.series.order_slices)

    @property
    def key(self) -> list[ClassifiedSlice]:
        return [self.slices[i] for i in self.finding.key_slices if 0 <= i < len(self.slices)]

    @property
    def reasons(self) -> Counter:
        """Why slices were not assessed: reason -> slices (the unreadable ones included)."""
        reasons = Counter(self.finding.not_assessed_reasons)
        if self.unread:
            reasons[UNREADABLE] += self.unread
        return reasons

    @property
    def first(self) -> Dataset:
        return self.slices[0].source

    def uid(self, kind: str, *more: object) -> str:
        model = self.finding.model
        return result_uid(kind, self.first.SeriesInstanceUID, model.sha256, f"{self.finding.threshold:g}", *more)


def segmented(result: ClassifiedSeries) -> list[ClassifiedSlice]:
    """The slices the series' Segmentation covers: none unless the series finding is a tumour; else
    those with a tumour region on a single-frame source with its geometry, of the first one's size and
    frame of reference (one Segmentation's frames share both)."""
    if not result.finding.tumour_detected:
        return []
    slices = [s for s in result.slices if s.prediction.region is not None and s.frame is None
              and on_its_frame(s.source)]
    return [s for s in slices if _grid(s.source) == _grid(slices[0].source)]


def _grid(source: Dataset) -> tuple:
    return int(source.Rows), int(source.Columns), str(source.FrameOfReferenceUID)


def summary_text(result: ClassifiedSeries) -> str:
    """The series finding in words, with the decision-support wording (the SR's and the KOS's text)."""
    finding, model = result.finding, result.finding.model
    who = f"{model.name} {model.version} (sha256 {model.sha256[:12]})"
    count = f"series of {len(result.slices)} slices, {finding.slices_assessed} assessed"
    reasons = result.reasons
    if result.ordering in ORDERING_WARNINGS:  # the rule's neighbours may not be neighbours in space
        count += f" ({ORDERING_WARNINGS[result.ordering]})"
    missing = "; ".join(f"{n} not assessed: {SERIES_REASONS.get(r, r)}" for r, n in sorted(reasons.items()))
    missing = f"; {missing}" if missing else ""
    if not finding.assessed:
        return f"{who}: {count}{missing}; not assessed: no finding is reported. {DISCLAIMER}"
    text = f"{who}: {count}{missing}; most likely class {finding.label}"
    if finding.tumour_probability is not None:
        decision = "detected" if finding.tumour_detected else "not detected"
        text += (f"; series tumour probability {finding.tumour_probability:.1%}, tumour {decision} at threshold "
                 f"{finding.threshold:.1%}")
    positions = [result.slices.index(s) + 1 for s in result.key]
    if positions:
        text += f"; key slices (1 = first in slice order) {', '.join(map(str, positions))}"
    if finding.tumour_detected:
        text += not_specific_words([s.prediction for s in result.key])
    rule = f" Rule: {finding.rule}." if finding.rule else ""
    return f"{text}.{rule} {DISCLAIMER}"


def _series_group(result: ClassifiedSeries) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    finding = result.finding
    example = result.slices[0].prediction
    algorithm = algorithm_of(example)

    def number(name, value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=NO_UNITS, algorithm_id=algorithm)

    measurements = [number(SLICES_ASSESSED, finding.slices_assessed),
                    number(SLICES_NOT_ASSESSED, finding.slices_not_assessed + result.unread)]
    evaluations = []
    if finding.assessed:
        if finding.tumour_probability is not None:
            measurements.append(number(TUMOUR_PROBABILITY, finding.tumour_probability))
        measurements.append(number(TUMOUR_THRESHOLD, finding.threshold))
        if finding.tumour_detected is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(
                TUMOUR, codes.SCT.Present if finding.tumour_detected else codes.SCT.Absent))
    evaluations += [hd.sr.QualitativeEvaluation(NOT_ASSESSED_BECAUSE, _local(reason.upper(),
                                                                             SERIES_REASONS.get(reason, reason)))
                    for reason in sorted(result.reasons)]
    key = result.key or result.slices[:1]  # the series' first slice stands for a series not assessed
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result.uid("series-tracking"),
                                                     identifier=f"{SERIES_FINDING} by {finding.model.name}"[:64]),
        finding_type=class_code(example, finding.label) if finding.assessed and finding.label else NO_FINDING,
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations or None,
        source_images=[source_image(s.source, s.frame) for s in key],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=summary_text(result), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def slice_group(s: ClassifiedSlice) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 of one slice of the series, compact (a series has hundreds): its class and tumour
    probabilities, or why it was not assessed, and its source image. The algorithm, the threshold and
    the out-of-distribution threshold are the series group's (the same for every slice)."""
    prediction, model = s.prediction, s.prediction.model
    measurements, evaluations = [], []
    if prediction.assessed:
        measurements = [hd.sr.Measurement(name=_probability_code(prediction, label), value=round(float(p), 6),
                                          unit=NO_UNITS) for label, p in prediction.probabilities.items()]
        if prediction.tumour_probability is not None:
            measurements.append(hd.sr.Measurement(name=TUMOUR_PROBABILITY, value=round(prediction.tumour_probability,
                                                                                       6), unit=NO_UNITS))
    else:
        evaluations = [hd.sr.QualitativeEvaluation(NOT_ASSESSED_BECAUSE, _local(reason.upper(),
                                                                                SERIES_REASONS.get(reason, reason)))
                       for reason in prediction.ood_reasons]
    if prediction.ood_score is not None:
        measurements.append(hd.sr.Measurement(name=OOD_SCORE, value=round(float(prediction.ood_score), 6),
                                              unit=NO_UNITS))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("tracking", s.source.SOPInstanceUID, model.sha256, *([] if s.frame is None else [s.frame])),
            identifier=f"btd classification of one slice by {model.name}"[:64]),
        finding_type=class_code(prediction, prediction.label) if prediction.assessed else NO_FINDING,
        measurements=measurements or None, qualitative_evaluations=evaluations or None,
        source_images=[source_image(s.source, s.frame)])


def slice_item(s: ClassifiedSlice) -> Dataset:
    """The slice's group as an SR content item, built when first asked (``SeriesClassifier`` asks as it
    classifies, while the series still arrives: a series of hundreds costs a second or more) and kept."""
    if s.sr_item is None:
        s.sr_item = slice_group(s)[0]
    return s.sr_item


def warm_up() -> None:
    """Load the tables highdicom reads when it builds its first document (about 0.4 s, once a process),
    before the first series is waiting for its results. Best effort: a private helper of highdicom."""
    try:
        from highdicom._standard_utils import is_attribute_in_iod
        from pydicom.uid import ComprehensiveSRStorage

        is_attribute_in_iod("PatientName", ComprehensiveSRStorage)
    except Exception:  # noqa: BLE001, S110 - a later highdicom without it: the first document pays instead
        pass


def _evidence_of(slices: Sequence[ClassifiedSlice]) -> list[Dataset]:
    """Each source instance once (a multi-frame one holds several slices). The first is whole: highdicom
    copies the patient and study from it; the others need only their UIDs (copying hundreds of headers
    costs seconds)."""
    seen: dict[str, Dataset] = {}
    for s in slices:
        seen.setdefault(str(s.source.SOPInstanceUID), s.source)
    first, *others = seen.values()
    return [evidence_copy(first), *(_uids_of(ds) for ds in others)]


def _uids_of(source: Dataset) -> Dataset:
    ds = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        setattr(ds, keyword, source[keyword].value)
    return ds


def _segment_group(result: ClassifiedSeries,
                   regions: Sequence[ClassifiedSlice]) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411: the series' tumour region, by reference to the Segmentation's segment of the series."""
    finding = result.finding
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result.uid("seg-tracking"),
                                                     identifier=f"{SEGMENT_LABEL} by {finding.model.name}"[:64]),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=SegmentationStorage, sop_instance_uid=result.uid("seg"), segment_number=SEGMENT_NUMBER,
            # the source series, not each image: the Segmentation's frames name their images, and a
            # hundred source images here cost highdicom's checks of the SR a noticeable fraction of a second
            source_series=hd.sr.SourceSeriesForSegmentation(str(regions[0].source.SeriesInstanceUID))),
        finding_type=codes.SCT.Neoplasm, algorithm_id=algorithm_of(regions[0].prediction))


def _segmentation_evidence(result: ClassifiedSeries) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = result.first.StudyInstanceUID
    ds.SeriesInstanceUID, ds.SOPInstanceUID = result.uid("seg-series"), result.uid("seg")
    ds.SOPClassUID = SegmentationStorage
    return ds


def build_series_sr(result: ClassifiedSeries) -> list[Dataset]:
    """The one Comprehensive SR of the series (referencing the Segmentation when there is one)."""
    finding = result.finding
    regions = segmented(result)
    groups = [_series_group(result), *([_segment_group(result, regions)] if regions else [])]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer(finding.model)),
        procedure_reported=procedure_of(result.first), imaging_measurements=groups)
    evidence = _evidence_of(result.slices) + ([_segmentation_evidence(result)] if regions else [])
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=report[0],
        series_instance_uid=result.uid("series-sr-series"), series_number=SERIES_SR_SERIES_NUMBER,
        sop_instance_uid=result.uid("series-sr"), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=finding.model.name[:64], software_versions=finding.model.version[:64],
        coding_schemes=[LOCAL_SCHEME_ITEM])
    # The slices' groups join the Imaging Measurements container after highdicom has built and checked the
    # document: its checks walk the whole tree, seconds for a series of hundreds of slices. Every slice
    # they reference is in the evidence already.
    (container,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    container.ContentSequence.extend(slice_item(s) for s in result.slices)
    return [sr]


def build_key_objects(result: ClassifiedSeries) -> list[Dataset]:
    """The Key Object Selection document flagging the key slices (none for a series not assessed)."""
    key = result.key
    if not result.finding.assessed or not key:
        return []
    sources = {str(s.source.SOPInstanceUID): s.source for s in key}  # a multi-frame source once
    frames: dict[str, list[int]] = {}
    for s in key:
        if s.frame is not None:
            frames.setdefault(str(s.source.SOPInstanceUID), []).append(s.frame + 1)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=list(sources.values()),
        observer_device_context=device_observer(result.finding.model),
        description=summary_text(result)[:1024])
    for item in content[0].ContentSequence:  # highdicom references whole images: name the key frames
        if item.ValueType == "IMAGE" and str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) in frames:
            reference = item.ReferencedSOPSequence[0]
            reference.ReferencedFrameNumber = frames[str(reference.ReferencedSOPInstanceUID)]
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=_evidence_of(key), content=content, series_instance_uid=result.uid("kos-series"),
        series_number=KOS_SERIES_NUMBER, sop_instance_uid=result.uid("kos"), instance_number=1,
        manufacturer=MANUFACTURER)
    kos.SeriesDescription = SERIES_DESCRIPTION
    return [kos]


def build_key_overlays(result: ClassifiedSeries) -> list[Dataset]:
    """The CAM overlay of each key slice (those classified with their CAM images)."""
    overlays = []
    for s in result.key:
        if s.overlay is None:
            continue
        sc = build_overlay(s.source, s.overlay, s.frame)
        if sc is not None:
            sc.SeriesInstanceUID = result.uid("key-overlay-series")
            sc.SeriesNumber = KEY_OVERLAY_SERIES_NUMBER
            overlays.append(sc)
    return overlays


def build_series_segmentation(result: ClassifiedSeries) -> list[Dataset]:
    """The one Segmentation of the series' tumour region (none without a region: ``segmented``)."""
    regions = segmented(result)
    if not regions:
        return []
    return [segmentation_of([s.source for s in regions], [s.prediction for s in regions],
                            series_instance_uid=result.uid("seg-series"), sop_instance_uid=result.uid("seg"),
                            instance_number=1)]


# Each builder adds its objects.
SERIES_BUILDERS: tuple[Callable[[ClassifiedSeries], list[Dataset]], ...] = (
    build_series_sr, build_key_objects, build_key_overlays, build_series_segmentation)


def build_series_results(result: ClassifiedSeries) -> list[Dataset]:
    """The SR first, then the KOS, the key slices' overlays and the Segmentation."""
    return [ds for build in SERIES_BUILDERS for ds in build(result)]
