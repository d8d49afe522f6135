"""DICOM result objects for one classified slice, built with highdicom from the source's header:

- a **Comprehensive SR** holding a TID 1500 *Imaging Measurement Report* (the template the IHE AI
  Results profile uses): the result, every class probability, the tumour probability, decision and
  threshold, the algorithm (TID 4019: model name, version, sha256) and the decision-support wording;
- a **Secondary Capture** image of the CAM overlay, with the tumour region's outline when the result
  has one, and a caption band (model, result, "not a diagnosis") burnt in, so that any viewer shows it.

Both copy the patient and study modules of the source and reference it (Current Requested
Procedure Evidence, the measurement group's source image, the SC's Source Image Sequence). Their
UIDs are derived from the source's UIDs, the model's sha256 and the threshold, so the same slice
through the same model gives the same objects: a retried send replaces instead of duplicating.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import uuid
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from app.core.acquisition import PLANE_WORDS, SEQUENCE_WORDS
from app.core.decode import DEFAULT_MAX_PIXELS, quiet_pydicom
from app.core.dicom_read import element_limits, read_dataset, results_header
from app.core.errors import InvalidImage, ServiceError
from app.core.result import CamPng, ModelIdentity, Prediction, Region, not_specific_warnings

MANUFACTURER = "btd"
LOCAL_SCHEME = "99BTD"  # a local coding scheme (PS3.16 8.2): the model's own class labels and quantities
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "btd AI result: decision support, not a diagnosis"
DISCLAIMER = ("Decision support for trained readers, not a diagnosis. Computed by an automated "
              "classifier of single MR slices; confirm on the images.")
OVERLAY_MIN_SIDE = 512  # the overlay is scaled up to this long side, so its caption stays legible
REGION_RGB = (0, 255, 0)  # the tumour region's outline on the overlay: green, apart from the CAM's jet colours
NO_UNITS = codes.UCUM.NoUnits
# Patient and study attributes highdicom reads directly (type 2: present, possibly empty).
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")

# highdicom logs the source's SOP Instance UID at INFO while copying modules: keep tag values out of our logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)

_UID_NAMESPACE = uuid.UUID("5b0e8f6c-3c1e-4c2a-9d7e-6a1f0d2b7c41")


def result_uid(*parts: object) -> str:
    """A UID derived from ``parts`` (UUID-derived, "2.25." form, PS3.5 B.2): the same parts, the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


def read_source(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """The attributes of a DICOM Part 10 file that its results copy (``dicom_read.results_header``),
    read under ``dicom_read``'s limits, in this process: for a caller's own files (``btd predict``).
    Bytes from a client or a PACS are read in an isolated worker instead, with the pixels
    (``prepare(..., source=True)``). Messages never quote tag values (patient data)."""
    with quiet_pydicom(), element_limits():
        try:
            return results_header(read_dataset(data, max_pixels, stop_before_pixels=True))
        except (ServiceError, MemoryError):
            raise
        except Exception as exc:  # pydicom parses lazily: any element may fail on malformed input
            raise InvalidImage(f"the DICOM header could not be read ({type(exc).__name__})") from None


def evidence_copy(source: Dataset) -> Dataset:
    """A copy of the header with the type-2 patient/study attributes present (empty when absent)."""
    evidence = copy.deepcopy(source)
    for keyword in TYPE2_COPIED:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    return evidence


def _local(value: str, meaning: str) -> Code:
    return Code(value[:16], LOCAL_SCHEME, meaning[:64])


def class_code(result: Prediction, label: str) -> Code:
    """The model's class as a code of the local scheme (its label; the index where the label is too long)."""
    value = label if len(label) <= 16 else f"CLASS-{tuple(result.probabilities).index(label)}"
    return _local(value, label)


def _probability_code(result: Prediction, label: str) -> Code:
    value = f"P-{label}" if len(label) <= 14 else f"P-CLASS-{tuple(result.probabilities).index(label)}"
    return _local(value, f"Probability of {label}")


TUMOUR_PROBABILITY = _local("TUMOUR-P", "Tumour probability (1 - p(notumor))")
TUMOUR_THRESHOLD = _local("TUMOUR-THRESHOLD", "Tumour decision threshold")
OOD_SCORE = _local("OOD-SCORE", "Out-of-distribution score")
OOD_THRESHOLD = _local("OOD-THRESHOLD", "Out-of-distribution threshold")
IN_DISTRIBUTION = _local("IN-DISTRIBUTION", "Input like the model's training data")
NO_FINDING = _local("NO-FINDING", "No finding: input not assessed")
TUMOUR = Code("108369006", "SCT", "Neoplasm")
# What the source's headers say (the intended-use gate, app.core.acquisition), and why a slice is not assessed.
PLANE = _local("PLANE", "Image plane, from the source's headers")
SEQUENCE = _local("SEQUENCE", "MR sequence, from the source's headers")
NOT_ASSESSED_BECAUSE = _local("NOT-ASSESSED", "Not assessed because")
REASONS = {"modality": "Not an MR image", "plane": "Plane outside the model's validated use",
           "sequence": "Sequence outside the model's validated use", "model": "Input unlike the training data",
           "no-head": "No head found in the image", "small-image": "Image too small to be a whole slice"}


def _acquisition_evaluations(result: Prediction) -> list[hd.sr.QualitativeEvaluation]:
    """The plane and sequence the source's headers say, and each reason the slice is not assessed, as
    codes of the local scheme."""
    out = []
    acquisition = result.acquisition
    if acquisition is not None and acquisition.plane is not None:
        out.append(hd.sr.QualitativeEvaluation(PLANE, _local(acquisition.plane.upper(), PLANE_WORDS[acquisition.plane])))
    if acquisition is not None and acquisition.sequence is not None:
        out.append(hd.sr.QualitativeEvaluation(
            SEQUENCE, _local(acquisition.sequence.upper(), SEQUENCE_WORDS[acquisition.sequence])))
    if not result.assessed:
        out += [hd.sr.QualitativeEvaluation(NOT_ASSESSED_BECAUSE, _local(reason.upper(), REASONS[reason]))
                for reason in result.ood_reasons]
    return out


def _num(name: Code, value: float, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=round(float(value), 6), unit=NO_UNITS, algorithm_id=algorithm)


def algorithm_of(result: Prediction) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the model, its file's sha256 and the decision threshold."""
    model = result.model
    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, manufacturer=MANUFACTURER,
        parameters=[f"sha256={model.sha256}", f"tumour_threshold={result.threshold:g}"],
    )


def source_image(source: Dataset, frame: int | None = None) -> hd.sr.SourceImageForMeasurementGroup:
    """The reference to a slice: an image, or frame ``frame`` (0-based) of a multi-frame one."""
    return hd.sr.SourceImageForMeasurementGroup.from_source_image(
        source, referenced_frame_numbers=None if frame is None else [frame + 1])


def measurement_group(source: Dataset, result: Prediction,
                      frame: int | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 of one slice's finding (``frame``: of a multi-frame source)."""
    algorithm = algorithm_of(result)
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if result.assessed:
        measurements += [_num(_probability_code(result, label), p, algorithm)
                         for label, p in result.probabilities.items()]
        if result.tumour_probability is not None:
            measurements.append(_num(TUMOUR_PROBABILITY, result.tumour_probability, algorithm))
        measurements.append(_num(TUMOUR_THRESHOLD, result.threshold, algorithm))
        if result.tumour_detected is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(
                TUMOUR, codes.SCT.Present if result.tumour_detected else codes.SCT.Absent))
    if result.ood_score is not None:
        measurements.append(_num(OOD_SCORE, result.ood_score, algorithm))
        if result.ood_threshold is not None:
            measurements.append(_num(OOD_THRESHOLD, result.ood_threshold, algorithm))
    if result.in_distribution is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            IN_DISTRIBUTION, codes.SCT.Yes if result.in_distribution else codes.SCT.No))
    evaluations += _acquisition_evaluations(result)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("tracking", source.SOPInstanceUID, result.model.sha256, *([] if frame is None else [frame])),
            identifier=f"btd classification of one slice by {result.model.name}"[:64]),
        finding_type=class_code(result, result.label) if result.assessed else NO_FINDING,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[source_image(source, frame)],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=summary_text(result),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def summary_text(result: Prediction) -> str:
    """The finding in words, with the decision-support wording (the SR's comment, the overlay's caption)."""
    model = result.model
    who = f"{model.name} {model.version} (sha256 {model.sha256[:12]})"
    if not result.assessed:
        why = _outside_words(result)
        if set(result.ood_reasons) - {"plane", "sequence"}:
            score = "" if result.ood_score is None else f" (score {result.ood_score:.3g}"
            score += "" if not score or result.ood_threshold is None else f" > threshold {result.ood_threshold:.3g})"
            score += ")" if score and result.ood_threshold is None else ""
            why.append(f"the input is unlike the model's training data{score}")
        return f"{who}: not assessed: {'; '.join(why)}; no finding is reported. " + DISCLAIMER
    text = f"{who}: most likely class {result.label} ({result.probabilities[result.label]:.1%})"
    if result.tumour_probability is not None:
        decision = "detected" if result.tumour_detected else "not detected"
        text += (f"; tumour probability {result.tumour_probability:.1%}, tumour {decision} "
                 f"at threshold {result.threshold:.1%}")
    return f"{text}{not_specific_words([result])}. {DISCLAIMER}"


def not_specific_words(predictions: Sequence[Prediction]) -> str:
    """"; " and the warnings of tumours called where the tumour call is not specific (each once), or ""."""
    return "".join(f"; {w}" for w in not_specific_warnings(predictions))


def _outside_words(result: Prediction) -> list[str]:
    """The gate's reasons in words (the plane and sequence the headers say)."""
    acquisition, words = result.acquisition, []
    if acquisition is not None and "plane" in result.ood_reasons:
        words.append(f"the source's headers say the plane is {PLANE_WORDS.get(acquisition.plane or '', 'unknown')}, "
                     "outside the model's validated use")
    if acquisition is not None and "sequence" in result.ood_reasons:
        words.append(f"the source's headers say the sequence is "
                     f"{SEQUENCE_WORDS.get(acquisition.sequence or '', 'unknown')}, outside the model's validated use")
    return words


def procedure_of(source: Dataset) -> Code:
    """CID 100: MRI (body region unspecified: the slice's header may not say) for MR, else any imaging."""
    if str(source.get("Modality", "")).upper() == "MR":
        return codes.cid100.MRIUnspecifiedBodyRegion
    return codes.cid100.ImagingProcedure


def device_observer(model: ModelIdentity) -> hd.sr.ObserverContext:
    """The model as the observing device (TID 1004)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", model.sha256), name=model.name[:64], manufacturer_name=MANUFACTURER,
        model_name=model.name[:64], serial_number=model.version[:64])
    return hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)


LOCAL_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=LOCAL_SCHEME, name="btd model classes and outputs", responsible_organization=MANUFACTURER)


def build_sr(source: Dataset, result: Prediction) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR (TID 1500) of one finding about ``source``."""
    model = result.model
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer(model)),
        procedure_reported=procedure_of(source),
        imaging_measurements=[measurement_group(source, result)],
    )
    scheme = LOCAL_SCHEME_ITEM
    key = (model.sha256, f"{result.threshold:g}")
    return hd.sr.ComprehensiveSR(
        evidence=[evidence_copy(source)], content=report[0],
        series_instance_uid=result_uid("sr-series", source.SeriesInstanceUID, *key), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid("sr", source.SOPInstanceUID, *key), instance_number=instance_number_of(source),
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=SERIES_DESCRIPTION, manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64], coding_schemes=[scheme],
    )


def instance_number_of(source: Dataset) -> int:
    try:
        return max(1, int(source.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Row and column directions as patient-orientation letters (PS3.3 C.7.6.1.1.1), from Image
    Orientation (Patient): the main axes of each direction cosine, largest first; None without it."""
    try:
        cosines = [float(v) for v in source.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(cosines) != 6:
        return None

    def letters(vector: Sequence[float]) -> str:
        order = sorted(range(3), key=lambda i: -abs(vector[i]))
        return "".join(("LPH" if vector[i] > 0 else "RAF")[i] for i in order if abs(vector[i]) > 0.25)[:3]

    row, col = letters(cosines[:3]), letters(cosines[3:])
    return (row, col) if row and col else None


def _fit_text(text: str, width: int, max_scale: float) -> tuple[float, int]:
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max_scale
    while scale > 0.3:
        (w, _), _ = cv2.getTextSize(text, font, scale, 1)
        if w <= width:
            break
        scale -= 0.05
    return scale, max(1, round(scale * 1.5))


def caption_lines(result: Prediction) -> list[str]:
    """The caption burnt into the overlay (ASCII: the overlay's font has nothing else)."""
    model = result.model
    lines = [f"{model.name} {model.version}"]
    if result.assessed:
        lines[0] += f": {result.label} {result.probabilities[result.label]:.0%}"
        if result.tumour_probability is not None:
            decision = "DETECTED" if result.tumour_detected else "not detected"
            lines.append(f"tumour {result.tumour_probability:.0%} (threshold {result.threshold:.0%}): {decision}")
    elif set(result.ood_reasons) <= {"plane", "sequence"}:
        lines.append("outside the model's validated use (plane or sequence): no finding")
    else:
        lines.append("input unlike the training data: no finding")
    if result.region is not None:
        lines.append("Green outline: the model's tumour region.")
    lines.append("CAM: where the model looked. Decision support, not a diagnosis.")
    return [line.encode("ascii", "replace").decode("ascii") for line in lines]


def render_overlay(overlay: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """The RGB overlay scaled up to ``OVERLAY_MIN_SIDE`` (long side) with a caption band below it."""
    height, width = overlay.shape[:2]
    scale = max(1.0, OVERLAY_MIN_SIDE / max(height, width))
    if scale > 1.0:
        overlay = cv2.resize(overlay, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_LINEAR)
    height, width = overlay.shape[:2]
    line_height = max(18, width // 24)
    band = np.zeros((line_height * len(lines) + line_height // 2, width, 3), np.uint8)
    for i, line in enumerate(lines):
        font_scale, thickness = _fit_text(line, width - 8, line_height / 30.0)
        cv2.putText(band, line, (4, line_height * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return np.ascontiguousarray(np.vstack([overlay, band]))


def overlay_rgb(result: Prediction) -> np.ndarray | None:
    """The CAM blended on the slice (RGB uint8, at the slice's aspect) when the result has the CAM
    images (``cam=png``), else None."""
    if not isinstance(result.cam, CamPng):
        return None
    image = cv2.imdecode(np.frombuffer(base64.b64decode(result.cam.overlay_png), np.uint8), cv2.IMREAD_COLOR)
    if image is None:  # pragma: no cover - the service encodes these PNGs itself
        raise ValueError("the CAM overlay PNG could not be decoded")
    return np.ascontiguousarray(image[:, :, ::-1])


def draw_region(overlay: np.ndarray, region: Region, image_size: tuple[int, int]) -> np.ndarray:
    """The region's contours drawn on ``overlay`` (RGB, a picture of the ``image_size`` (width, height)
    slice at its aspect: the region's pixel coordinates are scaled to it)."""
    height, width = overlay.shape[:2]
    sx, sy = width / image_size[0], height / image_size[1]
    polygons = [np.rint((np.array(c, np.float64) + 0.5) * (sx, sy) - 0.5).astype(np.int32) for c in region.contours]
    out = overlay.copy()
    cv2.polylines(out, polygons, isClosed=True, color=REGION_RGB, thickness=max(1, round(max(height, width) / 256)),
                  lineType=cv2.LINE_AA)
    return out


def build_overlay(source: Dataset, result: Prediction, frame: int | None = None) -> hd.sc.SCImage | None:
    """The Secondary Capture of the CAM overlay, the tumour region outlined when there is one (None
    when the finding has no overlay); ``frame``: of that frame (0-based) of a multi-frame source."""
    overlay = overlay_rgb(result)
    if overlay is None:
        return None
    if result.region is not None:
        overlay = draw_region(overlay, result.region, (result.region.image_width, result.region.image_height))
    pixels = render_overlay(overlay, caption_lines(result))
    orientation = patient_orientation(source)
    key = (result.model.sha256, f"{result.threshold:g}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence_copy(source), pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"),  # highdicom takes single letters: set below
        series_instance_uid=result_uid("overlay-series", source.SeriesInstanceUID, *key),
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=result_uid("overlay", source.SOPInstanceUID, *key, *([] if frame is None else [frame])),
        instance_number=instance_number_of(source), manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian, series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=result.model.name[:64], software_versions=result.model.version[:64],
    )
    sc.PatientOrientation = list(orientation) if orientation else None  # oblique: "PL"; unknown: empty (type 2)
    sc.Laterality = source.get("Laterality") or None  # type 2C: the source's, else empty (a brain is not paired)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    outline = ", tumour region outlined" if result.region is not None else ""
    sc.DerivationDescription = (f"class activation map of {result.model.name} {result.model.version} "
                                f"blended on the slice{outline}, caption added")[:1024]
    sc.BurnedInAnnotation = "NO"  # the caption names the model and the result, not the patient
    sc.ImageComments = summary_text(result)[:10240]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        reference.ReferencedFrameNumber = frame + 1
    sc.SourceImageSequence = [reference]
    return sc


def build_results(source: Dataset, result: Prediction) -> list[Dataset]:
    """The SR, then the overlay when the finding has one."""
    overlay = build_overlay(source, result)
    return [build_sr(source, result), *([overlay] if overlay is not None else [])]


def encode(dataset: Dataset) -> bytes:
    """DICOM Part 10 bytes (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
