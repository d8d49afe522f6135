"""The typed result of one prediction: what ``Engine`` returns, what ``POST /v1/predict`` sends
(plus ``request_id``), what ``btd predict`` prints and what the metrics count. Defined once here;
the HTTP schema and the OpenAPI document are generated from these classes (``app.transports.http.schemas``).

Plain dataclasses (the core needs no web framework); the ``Field`` annotations only describe them
for the schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from app.core.acquisition import Acquisition

# How the warning of an out-of-distribution image begins (the CLI and the web page look for it).
OOD_PHRASE = "the image does not look like a brain MR slice"
# How the warning of a slice outside the model's validated use (plane, sequence) begins.
GATE_PHRASE = "the slice is outside what the model is validated for"
NOT_ASSESSED_PHRASES = (GATE_PHRASE, OOD_PHRASE)  # the warnings that say why an image is not assessed
# How the warning of a tumour called where the tumour call is not specific begins (ValidatedUse.specific).
NOT_SPECIFIC_PHRASE = "a tumour is called on a"


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


@dataclass(frozen=True)
class CamBox:
    """Where the CAM lies in the decoded image, in its pixels (x to the right, y down): the square the
    model saw. It may reach past the image edges (padding); a version-1 model's box is the whole image."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class CamPng:
    format: Literal["png"]
    label: Annotated[str, Field(description="the class the map explains (the predicted one)")]
    width: Annotated[int, Field(ge=1)]
    height: Annotated[int, Field(ge=1)]
    image_png: Annotated[str, Field(description="base64 PNG: the input slice as the model saw its intensities, 8-bit gray")]
    heatmap_png: Annotated[str, Field(description="base64 RGBA PNG, same size: colour-mapped CAM placed where the "
                                      "model looked, alpha follows it (transparent outside the box)")]
    overlay_png: Annotated[str, Field(description="base64 PNG: the heatmap blended onto the image")]
    box: Annotated[CamBox, Field(description="the map's square in the decoded image's pixels")]


@dataclass(frozen=True)
class CamGrid:
    format: Literal["grid"]
    label: Annotated[str, Field(description="the class the map explains (the predicted one)")]
    shape: Annotated[list[int], Field(min_length=2, max_length=2, description="[h, w] at feature resolution")]
    grid: Annotated[list[list[float]], Field(description="the CAM normalised to [0, 1], h rows of w values")]
    box: Annotated[CamBox, Field(description="where the grid lies in the decoded image, in its pixels: row 0 is "
                                 "the top edge of the box, column 0 its left edge")]


@dataclass(frozen=True)
class RegionBox:
    """A rectangle of the decoded image, in its pixels (x to the right, y down): the pixels
    ``[x, x + width) x [y, y + height)``, inside the image."""

    x: Annotated[int, Field(ge=0)]
    y: Annotated[int, Field(ge=0)]
    width: Annotated[int, Field(ge=1)]
    height: Annotated[int, Field(ge=1)]


@dataclass(frozen=True)
class RegionPeak:
    x: Annotated[float, Field(description="column of the pixel centre, in the decoded image's pixels")]
    y: Annotated[float, Field(description="row of the pixel centre, in the decoded image's pixels")]
    probability: Annotated[float, Field(ge=0, le=1, description="the tumour map's probability there")]


@dataclass(frozen=True)
class Region:
    """Where the model's tumour map places the tumour, in the decoded image's pixels: its map
    (bilinear over the square the model saw, see ``CamBox``) thresholded, and the connected parts at
    least the model's smallest area kept (largest first, at most a few)."""

    contours: Annotated[list[list[list[float]]], Field(
        description="the outer contour of each kept part, largest first: a closed polygon of [x, y] points (pixel "
                    "centres, x to the right, y down), simplified to a bounded number of points")]
    box: Annotated[RegionBox, Field(description="the bounding box of the kept parts")]
    area_px: Annotated[float, Field(ge=0, description="their area, in the decoded image's pixels")]
    area_share: Annotated[float, Field(ge=0, le=1, description="their area as a share of the model's input square")]
    peak: Annotated[RegionPeak, Field(description="the region's point of highest tumour probability")]
    threshold: Annotated[float, Field(description="the map probability from which a pixel is in the region "
                                      "(the model's)")]
    min_area: Annotated[float, Field(description="the smallest part reported, as a share of the model's input "
                                     "square (the model's)")]
    image_width: Annotated[int, Field(ge=1, description="the decoded image's width: the frame of these coordinates "
                                      "(draw them over a picture of the image scaled to this size)")]
    image_height: Annotated[int, Field(ge=1, description="the decoded image's height")]


Cam = Annotated[CamPng | CamGrid, Field(discriminator="format")]
OodReason = Literal["modality", "plane", "sequence", "model", "no-head", "small-image"]


@dataclass(frozen=True)
class Timings:
    decode: float
    preprocess: float
    queue: float
    inference: float
    cam: float
    total: float
    region: Annotated[float, Field(description="finding the tumour region (0 without one)")] = 0.0


@dataclass(frozen=True)
class Prediction:
    model: ModelIdentity
    label: str
    probabilities: Annotated[dict[str, float], Field(description="calibrated (temperature-scaled), sum to 1")]
    tumour_probability: Annotated[float | None, Field(description="1 - p(notumor); null without that class")]
    tumour_detected: Annotated[bool | None, Field(
        description="tumour_probability >= threshold; null when the model has no 'notumor' class or the "
                    "image is out of distribution (no finding is made then)")]
    threshold: float
    cam: Cam | None
    timings_ms: Timings
    warnings: list[str]
    in_distribution: Annotated[bool | None, Field(
        description="false when the image is not assessed: it does not look like a brain MR slice the model "
                    "knows (it is not MR, the model's out-of-distribution score is over its threshold, no head "
                    "was found, or the image is too small to be a whole slice), or its DICOM headers say a plane "
                    "or sequence the model is not validated for; null when the model cannot say and no image "
                    "rule fired")] = None
    ood_score: Annotated[float | None, Field(
        description="the model's out-of-distribution score (larger: less like its training data); null when "
                    "the model has no such output")] = None
    ood_threshold: Annotated[float | None, Field(
        description="the model's out-of-distribution threshold (calibrated on its validation split): a score "
                    "over it is out of distribution; null when the model has no such output")] = None
    ood_reasons: Annotated[list[OodReason], Field(
        description="why the image is not assessed: modality (a DICOM whose Modality is not MR, or a "
                    "PNG / JPEG / DICOM without Modality that looks like a CT slice), plane and sequence (an MR "
                    "DICOM whose headers say a plane or sequence outside the model's validated use: see "
                    "acquisition and GET /v1/model), model (its score is over the model's threshold), no-head "
                    "(no head found), small-image (short side under 100 pixels); empty otherwise")] = field(
        default_factory=list)
    acquisition: Annotated[Acquisition | None, Field(
        description="what an MR DICOM's headers say about the slice (the intended-use gate reads them); null "
                    "for a PNG, a JPEG or a DICOM of another modality (nothing to read)")] = None
    region: Annotated[Region | None, Field(
        description="the tumour region from the model's tumour map (the same forward pass), when the image is "
                    "assessed and a tumour is called (tumour_detected true); null when the model has no tumour map "
                    "(see GET /v1/model, localisation), when no tumour is called or the image is not assessed, or "
                    "when no part of the thresholded map reaches the model's smallest area")] = None

    @property
    def assessed(self) -> bool:
        """False when the image is not what the model was validated on: then there is no finding."""
        return self.in_distribution is not False

    @property
    def confidence(self) -> float:
        """Probability of the predicted label."""
        return self.probabilities[self.label]

    def to_dict(self) -> dict[str, Any]:
        return _PREDICTION.dump_python(self)  # pydantic's serializer: ~40x faster than dataclasses.asdict

    def to_json(self, request_id: str) -> bytes:
        """The HTTP response body: ``request_id`` first, then the prediction, serialised once (the
        route's hot path: no dict is built and validated again)."""
        return b'{"request_id":' + json.dumps(request_id).encode() + b"," + _PREDICTION.dump_json(self)[1:]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        """A response body (e.g. from a remote service) back into the typed result (validated)."""
        return _PREDICTION.validate_python({k: v for k, v in data.items() if k != "request_id"})


_PREDICTION = TypeAdapter(Prediction)


@dataclass(frozen=True)
class ModelOutput:
    """The model's outputs for one image."""

    logits: Any  # np.ndarray [C]
    features: Any = None  # np.ndarray [K, h, w] when a CAM was asked for
    ood_score: float | None = None
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 1
    tumour_map: Any = None  # np.ndarray [h, w] of a localising model (``ModelFile.localises``)


def not_specific_warnings(predictions: Sequence[Prediction]) -> list[str]:
    """The warnings of tumours called where the tumour call is not specific (``NOT_SPECIFIC_PHRASE``),
    each once, in order."""
    return list(dict.fromkeys(w for p in predictions for w in p.warnings if w.startswith(NOT_SPECIFIC_PHRASE)))
