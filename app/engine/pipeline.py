"""The pure steps around the model call, shared by every front end through ``Engine``:
bytes -> ``prepare`` (decode, frame, normalise, and the intended-use gate on an MR DICOM's headers:
``app.core.acquisition``; runs in a host worker) -> the model ->
``ResultBuilder.build`` (softmax with temperature, tumour decision, out-of-distribution verdict,
CAM placed on the image, tumour region) -> ``Prediction``. No FastAPI, no ONNX Runtime here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from app.core.acquisition import (
    PLANE_WORDS,
    SEQUENCE_WORDS,
    Acquisition,
    outside_validated,
    unchecked,
    validated_words,
)
from app.core.baseline import intensity_percentiles
from app.core.contract import (
    DEFAULT_VALIDATED,
    Framing,
    ModelMetadata,
    PreprocessSpec,
    ValidatedUse,
    frame,
    normalise,
)
from app.core.decision import Decision, decide
from app.core.decode import DEFAULT_MAX_PIXELS, DecodedImage, MultiframePolicy, decode
from app.core.errors import InvalidImage
from app.core.modality import looks_like_ct
from app.core.postprocess import (
    cam_grid,
    cam_images,
    class_activation_map,
    gray_view,
)
from app.core.region import tumour_region
from app.core.result import (
    GATE_PHRASE,
    NOT_SPECIFIC_PHRASE,
    OOD_PHRASE,
    CamBox,
    CamGrid,
    CamPng,
    ModelIdentity,
    ModelOutput,
    Prediction,
    Region,
    Timings,
)

CamMode = Literal["none", "png", "grid"]
CAM_MODES: tuple[str, ...] = get_args(CamMode)
# An image whose short side is under this many pixels is too small to be a whole MR slice.
MIN_SLICE_SIDE = 100
NOT_A_FINDING = "; the probabilities are not a finding and no tumour decision is made"
OOD_WARNING = OOD_PHRASE + " ({why})" + NOT_A_FINDING
GATE_WARNING = GATE_PHRASE + " ({why})" + NOT_A_FINDING
# Why an image is out of distribution -> the ``reason`` label of btd_out_of_distribution_total.
OOD_REASONS = {"modality": "{not_mr}",
               "model": "the model's out-of-distribution score {score:.3g} is over its threshold {threshold:.3g}",
               "no-head": "no head was found in it",
               "small-image": "it is {width}x{height} pixels, too small to be a whole slice"}
# The intended-use gate's reasons (``app.core.acquisition``): a warning of their own (GATE_PHRASE).
GATE_REASONS = {"plane": "its DICOM headers say the plane is {plane}; the model is validated on {planes} slices",
                "sequence": "its DICOM headers say the sequence is {sequence}; the model is validated on {sequences}"}
# What an MR DICOM's headers did not say: assessed, with this warning.
UNCHECKED = {"plane": "the slice's plane could not be checked (the DICOM has no usable Image Orientation "
                      "(Patient)); the model is validated on {planes} slices",
             "sequence": "the slice's sequence could not be checked (the DICOM's acquisition attributes and "
                         "Series Description do not say it); the model is validated on {sequences}"}

# A tumour called on a validated sequence where the tumour call is not specific (ValidatedUse.specific).
NOT_SPECIFIC = (NOT_SPECIFIC_PHRASE + " {sequence} slice, where the model is validated for a tumour's type but "
                "not for telling whether there is one: it calls many tumour-free {sequence} slices tumour (the "
                "model card's per-sequence table)")


# Why an image is not an MR slice (``Prepared.not_mr``) -> the words of its "modality" reason.
NOT_MR = {"dicom": "the DICOM says it is not an MR image",
          "ct-look": "it looks like a CT slice (a bright bone ring around grey brain), not MR"}


@dataclass(frozen=True)
class InputFacts:
    """What a prediction record keeps of an input: never patient data (no header, no file name, no
    pixels). ``pixels_sha256`` is the sha256 of the model-size float32 intensity image (``unit``, the
    contract's ``frame`` output, 200 KB at 224 pixels: ~0.1 ms), so the same image under the same
    preprocessing spec hashes the same; ``percentiles`` are the decoded slice's intensities at
    ``INTENSITY_PERCENTILES``, before any standardisation (for a tensor input: None)."""

    pixels_sha256: str
    width: int
    height: int
    media_type: str
    modality: str | None = None  # a DICOM's Modality; None when the input does not say
    sequence: str | None = None  # MR sequence and plane, when the DICOM headers said (app.core.acquisition)
    plane: str | None = None
    percentiles: tuple[float, ...] | None = None
    instance_sha256: str | None = None  # sha256 of a DICOM's SOP Instance UID (readers' feedback finds it by it)


def tensor_facts(tensor: np.ndarray) -> InputFacts:
    """The facts of a model input sent as a tensor (Open Inference Protocol): its hash and size only."""
    data = np.ascontiguousarray(tensor, dtype=np.float32)
    return InputFacts(hashlib.sha256(data.data).hexdigest(), int(data.shape[-1]), int(data.shape[-2]), "tensor")


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@dataclass(frozen=True)
class PrepareOptions:
    """Everything ``prepare`` needs; plain and picklable, so host worker processes get it per task."""

    spec: PreprocessSpec
    max_pixels: int = DEFAULT_MAX_PIXELS
    multiframe: MultiframePolicy = "middle"
    validated: ValidatedUse = DEFAULT_VALIDATED  # the model's validated use: the intended-use gate


@dataclass
class Prepared:
    """A request after decode and preprocess, ready for the model. It carries the model-size
    intensity image (``unit``, a third of the input tensor's bytes: what a host worker sends back),
    normalised into the input tensor where the batch is assembled."""

    unit: np.ndarray  # float32 [size, size], the contract's ``frame`` output
    spec: PreprocessSpec
    framing: Framing  # where the model's input lies in the decoded image
    image_size: tuple[int, int]  # (width, height) of the decoded image
    media_type: str
    warnings: list[str]
    view: np.ndarray | None = None  # uint8 view of the slice for the CAM images (cam=png only)
    not_mr: str | None = None  # why it is not an MR slice (a key of NOT_MR), None when nothing says so
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The DICOM attributes its DICOM results copy (``source=True``; patient data: never logged or answered)
    source: Any = None
    acquisition: Acquisition | None = None  # what an MR DICOM's headers say (plane, sequence)
    outside: list[str] = field(default_factory=list)  # the gate's reasons: "plane", "sequence"
    facts: InputFacts | None = None  # what a prediction record keeps of it (no patient data)

    @property
    def tensor(self) -> np.ndarray:
        """The model input, float32 ``[channels, size, size]`` (the contract's ``preprocess``)."""
        return normalise(self.unit, self.spec)

    @property
    def image_reasons(self) -> list[str]:
        """Reasons not to assess the image read from the image alone (not the model): not MR, a plane
        or sequence outside the model's validated use (the headers), no head, too small."""
        width, height = self.image_size
        reasons = ["modality"] if self.not_mr else list(self.outside)
        reasons += ["no-head"] if self.framing.head_found is False else []
        return reasons + (["small-image"] if min(width, height) < MIN_SLICE_SIDE else [])


def prepare(data: bytes, media_type: str | None, options: PrepareOptions, view: bool = False,
            source: bool = False, sniffed: str | None = None, frame_index: int | None = None) -> Prepared:
    """Bytes -> model input. Raises the typed errors of ``app.core.errors`` for bad input. ``view``: also
    keep the 8-bit view of the slice that ``cam=png`` draws on; ``source``: also read the attributes a
    DICOM's results copy, in the same read (``Prepared.source``), so a host worker reads a file once;
    ``sniffed``: the bytes' sniffed type; ``frame_index``: this frame of a multi-frame DICOM (a series)."""
    start = time.perf_counter()
    decoded = decode(data, media_type, max_pixels=options.max_pixels, multiframe=options.multiframe, source=source,
                     sniffed=sniffed, frame=frame_index)
    return prepare_decoded(decoded, options, view, ms_since(start))


def prepare_slice(pixels: np.ndarray, media_type: str, options: PrepareOptions, view: bool = False) -> Prepared:
    """A slice already decoded elsewhere (a NIfTI volume's, ``app.core.nifti``) -> model input."""
    if pixels.ndim != 2 or pixels.shape[0] * pixels.shape[1] > options.max_pixels:
        raise InvalidImage(f"a slice must be 2-D with at most {options.max_pixels} pixels")
    return prepare_decoded(DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), media_type), options, view,
                           0.0)


def prepare_decoded(decoded: DecodedImage, options: PrepareOptions, view: bool, decode_ms: float) -> Prepared:
    start = time.perf_counter()
    if not np.isfinite(decoded.pixels).all():
        raise InvalidImage("the image contains non-finite values")
    unit, framing = frame(decoded.pixels, options.spec)
    height, width = decoded.pixels.shape
    prepared = Prepared(unit, options.spec, framing, (width, height), decoded.media_type, list(decoded.warnings),
                        gray_view(decoded.pixels) if view else None, not_mr_because(decoded.modality, decoded.pixels),
                        source=decoded.source, acquisition=decoded.acquisition,
                        outside=outside_validated(decoded.acquisition, options.validated))
    prepared.warnings += unchecked_warnings(decoded.acquisition, options.validated)
    acquisition = decoded.acquisition
    prepared.facts = InputFacts(hashlib.sha256(np.ascontiguousarray(unit).data).hexdigest(), width, height,
                                decoded.media_type, decoded.modality or None,
                                sequence=None if acquisition is None else acquisition.sequence,
                                plane=None if acquisition is None else acquisition.plane,
                                percentiles=intensity_percentiles(decoded.pixels),
                                instance_sha256=decoded.instance_sha256)
    prepared.timings_ms = {"decode": decode_ms, "preprocess": ms_since(start)}
    return prepared


def unchecked_warnings(acquisition: Acquisition | None, validated: ValidatedUse) -> list[str]:
    """The warnings of what an MR DICOM's headers did not say (the slice is assessed all the same)."""
    planes, sequences = validated_words(validated)
    return [UNCHECKED[name].format(planes=planes, sequences=sequences) for name in unchecked(acquisition)]


def specificity_warnings(acquisition: Acquisition | None, validated: ValidatedUse, tumour_detected: bool | None
                         ) -> list[str]:
    """``NOT_SPECIFIC`` for a tumour called on a slice whose headers say a validated sequence on which
    the tumour call is not specific; else nothing."""
    sequence = None if acquisition is None else acquisition.sequence
    if tumour_detected is not True or sequence not in validated.sequences or sequence in validated.specific:
        return []
    return [NOT_SPECIFIC.format(sequence=SEQUENCE_WORDS.get(sequence, sequence))]


def not_mr_because(modality: str | None, pixels: np.ndarray) -> str | None:
    """Why a decoded slice is not MR: its DICOM Modality says another (``"dicom"``), or, when nothing
    says (PNG, JPEG, a DICOM without Modality), it has CT's look (``"ct-look"``); else None."""
    if modality == "MR":
        return None
    if modality:
        return "dicom"
    return "ct-look" if looks_like_ct(pixels) else None


def cam_box(prepared: Prepared) -> CamBox:
    f = prepared.framing
    return CamBox(round(f.x, 2), round(f.y, 2), round(f.side, 2), round(f.box_height, 2))


@dataclass(frozen=True)
class ResultBuilder:
    """Model outputs of one image -> ``Prediction``."""

    metadata: ModelMetadata
    cam_weights: np.ndarray  # float32 [C, K]
    sha256: str
    threshold: float

    @property
    def model_identity(self) -> ModelIdentity:
        return ModelIdentity(self.metadata.model_name, self.metadata.model_version, self.sha256)

    def cam_grid(self, output: ModelOutput) -> np.ndarray:
        """The CAM of the predicted class at feature resolution."""
        return class_activation_map(output.features, self.cam_weights, int(np.argmax(output.logits)))

    def decide(self, logits: np.ndarray, ood_score: float | None, image_reasons: Sequence[str] = ()) -> Decision:
        """The one decision (``app.core.decision``) with this model's labels, temperature and thresholds."""
        meta = self.metadata
        return decide(logits, meta.labels, temperature=meta.temperature, threshold=self.threshold,
                      ood_score=ood_score, ood_threshold=None if meta.ood is None else meta.ood.threshold,
                      image_reasons=image_reasons)

    def wants_region(self, output: ModelOutput, decision: Decision) -> bool:
        """A region is drawn for an assessed image with a tumour called, of a localising model."""
        return (self.metadata.localisation is not None and output.tumour_map is not None
                and decision.tumour_detected is True)

    def region(self, prepared: Prepared, output: ModelOutput, decision: Decision) -> Region | None:
        """The tumour region (``app.core.region``) when ``wants_region``, else None."""
        if not self.wants_region(output, decision):
            return None
        return tumour_region(output.tumour_map, self.metadata.localisation, prepared.framing, prepared.image_size)

    def ood_warnings(self, reasons: list[str], prepared: Prepared, ood_score: float | None) -> list[str]:
        """The warnings that say why the image is not assessed: the gate's (plane, sequence) first, then
        the out-of-distribution one (modality, model, no-head, small-image); one or both."""
        out = []
        gate = [r for r in reasons if r in GATE_REASONS]
        if gate and prepared.acquisition is not None:
            planes, sequences = validated_words(self.metadata.validated)
            acquisition = prepared.acquisition
            why = "; ".join(GATE_REASONS[r].format(
                plane=PLANE_WORDS.get(acquisition.plane or "", "unknown"), planes=planes, sequences=sequences,
                sequence=SEQUENCE_WORDS.get(acquisition.sequence or "", "unknown")) for r in gate)
            out.append(GATE_WARNING.format(why=why))
        other = [r for r in reasons if r in OOD_REASONS]
        if other:
            width, height = prepared.image_size
            threshold = self.metadata.ood.threshold if self.metadata.ood is not None else float("nan")
            why = "; ".join(OOD_REASONS[r].format(score=ood_score if ood_score is not None else float("nan"),
                                                  threshold=threshold, width=width, height=height,
                                                  not_mr=NOT_MR.get(prepared.not_mr or "", "")) for r in other)
            out.append(OOD_WARNING.format(why=why))
        return out

    def build(self, prepared: Prepared, output: ModelOutput, cam: str, *, started: float,
              cam_result: dict | None = None, cam_ms: float = 0.0,
              region_result: tuple[Region | None, float] | None = None) -> Prediction:
        """``cam_result``: the CAM images when they were rendered elsewhere (a host worker), for
        ``cam="png"``; without them they are rendered here. ``region_result``: (the tumour region, its
        ms) when it was found elsewhere; without it it is found here."""
        decision = self.decide(output.logits, output.ood_score, prepared.image_reasons)
        if region_result is None:
            region_start = time.perf_counter()
            region_result = self.region(prepared, output, decision), ms_since(region_start)
        region, region_ms = region_result
        warnings = list(prepared.warnings)
        if decision.ood_reasons:
            warnings += self.ood_warnings(decision.ood_reasons, prepared, output.ood_score)
        warnings += specificity_warnings(prepared.acquisition, self.metadata.validated, decision.tumour_detected)
        cam_out = None
        if cam != "none":
            cam_start = time.perf_counter()
            if cam == "grid":
                cam_out = CamGrid(**cam_grid(self.cam_grid(output)), label=decision.label, box=cam_box(prepared))
            else:
                images = cam_result or cam_images(prepared.view, self.cam_grid(output), prepared.framing,
                                                  prepared.image_size)
                cam_out = CamPng(**images, label=decision.label, box=cam_box(prepared))
            cam_ms += ms_since(cam_start)
        timings = {**prepared.timings_ms, "queue": output.queue_ms, "inference": output.inference_ms, "cam": cam_ms,
                   "region": region_ms}
        timings["total"] = ms_since(started)
        return Prediction(
            model=self.model_identity,
            label=decision.label,
            probabilities=decision.probabilities,
            tumour_probability=decision.tumour_probability,
            tumour_detected=decision.tumour_detected,
            threshold=decision.threshold,
            cam=cam_out,
            timings_ms=Timings(**{k: round(v, 3) for k, v in timings.items()}),
            warnings=warnings,
            in_distribution=decision.in_distribution,
            ood_score=decision.ood_score,
            ood_threshold=decision.ood_threshold,
            ood_reasons=decision.ood_reasons,
            acquisition=prepared.acquisition,
            region=region,
        )


def check_cam_mode(cam: str) -> str:
    if cam not in CAM_MODES:
        raise ValueError(f"cam must be one of {', '.join(CAM_MODES)}")
    return cam
