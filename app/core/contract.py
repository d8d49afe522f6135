"""The model contract: the only thing training/export and the service share.

One place for each fact that crosses the ONNX file: tensor names, metadata keys, the
preprocessing spec and the preprocessing function itself. Training's evaluation transform,
the exporter and the service all call :func:`preprocess`, so the tensor a model sees in
evaluation is the tensor it sees in production.

Imports numpy and OpenCV only (no torch, no FastAPI), so both sides can use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

CONTRACT_VERSION = "1"

# ONNX graph input / output names.
INPUT_NAME = "image"
LOGITS_NAME = "logits"
FEATURES_NAME = "features"
# Optional output (models from 1.2.0): [N] out-of-distribution score, larger = less like the training
# data; compared with the threshold in ``META_OOD``. Models without it cannot say.
OOD_NAME = "ood_score"
# Optional output (supervised localisation): float32 [N, 1, h, w], per-pixel tumour probability in
# [0, 1] over the model's input square (the square ``Framing`` places in the decoded image, the one
# the features and the CAM cover; h and w are read from the output, 28 for a 224 input). Read with
# ``META_LOCALISATION``; a model without both reports no tumour region.
TUMOUR_MAP_NAME = "tumour_map"

# Keys of the ONNX model's metadata_props (values are strings; structured ones are JSON).
META_CONTRACT = "btd.contract_version"
META_LABELS = "btd.labels"  # JSON list[str], in logit order
META_PREPROCESS = "btd.preprocess"  # JSON PreprocessSpec
META_CAM_WEIGHT = "btd.cam.weight"  # initializer name of the classifier weight [C, 2048]
META_CAM_BIAS = "btd.cam.bias"  # initializer name of the classifier bias [C]
META_TEMPERATURE = "btd.temperature"  # float, calibration temperature (logits / T)
META_THRESHOLD = "btd.tumour_threshold"  # float, recommended tumour decision threshold
META_NAME = "btd.model_name"
META_VERSION = "btd.model_version"
META_TRAINING_DATA = "btd.training_data"  # JSON summary of the training data
META_METRICS = "btd.metrics"  # JSON test metrics measured on this file
META_OOD = "btd.ood"  # JSON OodSpec, present when the graph has the ``OOD_NAME`` output
META_VALIDATED = "btd.validated_for"  # JSON ValidatedUse; models without it get DEFAULT_VALIDATED
# JSON Baseline (app.core.baseline): the validation split's distributions of the drift signals; models
# without it serve, with drift not measured.
META_BASELINE = "btd.baseline"
META_LOCALISATION = "btd.localisation"  # JSON LocalisationSpec: how to read the ``TUMOUR_MAP_NAME`` output

# The label meaning "no tumour"; tumour probability is 1 - p(this label) when present.
NO_TUMOUR_LABEL = "notumor"

_INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
SPEC_VERSIONS = (1, 2)
CROPS = ("none", "head")
ASPECTS = ("squash", "pad")
INTENSITIES = ("minmax", "head-percentiles")
# The head mask is found on a copy whose long side is at most this (fast, and robust to noise).
MASK_SIDE = 128
# A foreground smaller than this share of the image is not trusted as a head (blank, noise, a dot):
# the whole image is used instead.
MIN_HEAD_SHARE = 0.02


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded 2-D grayscale slice becomes the model's input tensor.

    Version 2 (source-invariant; models from 1.2.0): find the head (largest foreground region),
    crop to its bounding box plus ``head_margin`` of its long side, pad to a square with background
    (aspect kept), resize to ``size``, map the ``percentiles`` of the intensities inside the head to
    [0, 1] (clipped), replicate to ``channels``, normalise with ``mean`` / ``std``. Borders, framing,
    canvas size, aspect, offset and linear contrast then no longer reach the model.

    Version 1 (models up to 1.1.0; still served): min-max to [0, 1] over the whole image, resize to
    ``size`` squashing the aspect, replicate, normalise.
    """

    size: int = 224
    interpolation: str = "area"
    intensity: str = "head-percentiles"
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    version: int = 2
    crop: str = "head"
    head_margin: float = 0.04
    aspect: str = "pad"
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.version not in SPEC_VERSIONS:
            raise ValueError(f"preprocessing spec version {self.version!r}, this service reads {SPEC_VERSIONS}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"unknown intensity scaling {self.intensity!r}")
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop {self.crop!r}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"unknown aspect handling {self.aspect!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.size <= 0:
            raise ValueError("size must be positive")
        if not 0.0 <= self.head_margin <= 1.0:
            raise ValueError("head_margin must lie in [0, 1]")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")

    @classmethod
    def legacy(cls, size: int = 224) -> PreprocessSpec:
        """The version-1 preprocessing (whole-image min-max, squash), as models up to 1.1.0 expect."""
        return cls(size=size, intensity="minmax", version=1, crop="none", aspect="squash")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        """Any stored version; a spec without ``version`` is version 1 (written before versions existed)."""
        raw = json.loads(text)
        raw["mean"] = tuple(raw["mean"])
        raw["std"] = tuple(raw["std"])
        if raw.get("version", 1) == 1:
            defaults = asdict(cls.legacy())
            raw = {**defaults, **{k: v for k, v in raw.items() if k in defaults}, "version": 1}
        if "percentiles" in raw:
            raw["percentiles"] = tuple(raw["percentiles"])
        return cls(**raw)


@dataclass(frozen=True)
class Framing:
    """Where the model's square input lies in the decoded image, in that image's pixels: the
    square ``[x, x + side) x [y, y + side)`` (it may reach past the image edges, where the input
    is background padding). Maps model-space maps such as the CAM back onto the image."""

    x: float
    y: float
    side: float  # for a squashed (version 1) input: width and height differ, see ``height``
    height: float | None = None
    head_found: bool | None = None  # version 2: whether a head was found (else the whole image was used)

    @property
    def box_height(self) -> float:
        return self.side if self.height is None else self.height


def scale_intensity(gray: np.ndarray) -> np.ndarray:
    """Scale a 2-D image to [0, 1] in float32 by its own min and max (a flat image gives 0)."""
    g = np.asarray(gray, dtype=np.float32)
    lo = float(g.min())
    hi = float(g.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(g, dtype=np.float32)
    return (g - lo) * np.float32(1.0 / (hi - lo))


def _fill_holes(region: np.ndarray) -> np.ndarray:
    """Flood the background from outside; what the flood does not reach belongs to the region."""
    flood = np.pad(region, 1)
    cv2.floodFill(flood, None, (0, 0), 1)
    return region | (flood[1:-1, 1:-1] == 0).view(np.uint8)


def _major_regions(binary: np.ndarray, share: float) -> np.ndarray | None:
    """uint8 0/1 mask of the connected regions at least ``share`` of the largest one's area (None when
    there is none)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = np.flatnonzero(areas >= share * areas.max()) + 1
    if len(kept) == 1:
        return (labels == kept[0]).view(np.uint8)
    keep = np.zeros(count, dtype=np.uint8)
    keep[kept] = 1
    return keep[labels]


_OPEN_THIN = np.ones((3, 3), np.uint8)
_CLOSE_RING = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
_OPEN_SOLID = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
MAJOR_REGION_SHARE = 0.2


def head_region(unit: np.ndarray) -> tuple[np.ndarray, float]:
    """(boolean mask of the head, the foreground level in [0, 1] units) of a [0, 1] image; meant
    for a small copy (``MASK_SIDE``). See ``_head_region``."""
    mask, level = _head_region(np.asarray(unit, dtype=np.float32))
    return mask.astype(bool), level


def _head_region(unit: np.ndarray) -> tuple[np.ndarray, float]:
    """(uint8 0/1 mask of the head, the foreground level in [0, 1] units) of a small float32 [0, 1] image.

    Smooth (noise), threshold at half Otsu's level but never above a fifth of the 99th percentile
    (a bright lesion must not lift the threshold above the brain), open 3x3 (specks, text), close
    9x9 (a skull ring broken by dark fat or bone), fill holes, open 7x7 so that thin lines touching
    the head (frames, rulers) are cut off, and keep every region of at least a fifth of the largest
    one's area (the pieces of a head whose brain is dark, not a label in a corner)."""
    smooth = cv2.GaussianBlur(unit, (0, 0), 1.5)
    u8 = cv2.convertScaleAbs(smooth, alpha=255.0)  # rounds and saturates to 0..255, like clip(x * 255 + 0.5)
    otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    histogram = cv2.calcHist([u8], [0], None, [256], [0, 256]).reshape(-1)
    p99 = int(np.searchsorted(np.cumsum(histogram), 0.99 * u8.size))
    level = max(1.0, min(0.5 * otsu, 0.2 * p99))
    fg = cv2.threshold(u8, level, 1, cv2.THRESH_BINARY)[1]
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, _OPEN_THIN)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, _CLOSE_RING)
    solid = _fill_holes(fg)
    trimmed = cv2.morphologyEx(solid, cv2.MORPH_OPEN, _OPEN_SOLID)
    regions = _major_regions(trimmed, MAJOR_REGION_SHARE)
    if regions is None:
        regions = _major_regions(solid, MAJOR_REGION_SHARE)
    mask = np.zeros(unit.shape, dtype=np.uint8) if regions is None else regions
    return mask, level / 255.0


def _moments_square(mask: np.ndarray, scale: float, origin: tuple[float, float],
                    margin: float) -> tuple[float, float, float] | None:
    """(x, y, side) in image pixels of the square around a uint8 0/1 mask drawn on a grid of ``scale``
    image pixels per cell starting at ``origin`` (None when the mask is under ``MIN_HEAD_SHARE`` of
    the grid): centre = centroid, half side = 2 standard deviations along the longer axis (exactly
    the bounding box of an ellipse), plus ``margin`` of the side each way. Moments average over the
    whole region, so they barely move with pixel size, noise or a stray protrusion, where the
    extreme pixels of a bounding box would."""
    m = cv2.moments(mask, binaryImage=True)
    if m["m00"] < MIN_HEAD_SHARE * mask.size:
        return None
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    sx, sy = np.sqrt(max(m["mu20"], 0.0) / m["m00"]), np.sqrt(max(m["mu02"], 0.0) / m["m00"])
    half = 2.0 * max(float(sx) * scale, float(sy) * scale, 0.5 * scale)
    side = 2.0 * half * (1.0 + 2.0 * margin)
    return origin[0] + (cx + 0.5) * scale - side / 2.0, origin[1] + (cy + 0.5) * scale - side / 2.0, side


def _find_head(gray: np.ndarray, lo: float, k: float, margin: float) -> tuple[tuple[float, float, float], float | None]:
    """((x, y, side) of the square crop in image pixels, the head's foreground level in [0, 1] units, or
    None when no head was found and the square is the whole image) of a slice whose [0, 1] scaling is
    ``(gray - lo) * k``.

    Two passes: a coarse square from the whole image at ``MASK_SIDE``, then the head found again on
    that square (widened) resampled to ``MASK_SIDE``, so the final square and level are measured
    at the head's own scale and do not depend on the canvas around it."""
    h, w = gray.shape
    whole = (min(0.0, (w - h) / 2.0), min(0.0, (h - w) / 2.0), float(max(w, h)))
    lo32, k32 = np.float32(lo), np.float32(k)
    mask, level = _head_region((_crop_square(gray, whole, MASK_SIDE, cv2.INTER_AREA, lo) - lo32) * k32)
    coarse = _moments_square(mask, whole[2] / MASK_SIDE, whole[:2], 0.15)
    if coarse is None:
        return whole, None
    mask, level = _head_region((_crop_square(gray, coarse, MASK_SIDE, cv2.INTER_AREA, lo) - lo32) * k32)
    box = _moments_square(mask, coarse[2] / MASK_SIDE, coarse[:2], margin)
    if box is None:  # pragma: no cover - the coarse pass found a head in this square
        return coarse, None
    return box, level


def _percentile_window(square: np.ndarray, level: float | None, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) of the intensity window, taken on the model-size square, so the same pixels count
    whatever the canvas, border or pixel size of the input: lo is the low percentile of the whole
    square (the background, or the darkest tissue of a head that fills it), hi the high percentile
    of the head (pixels above its foreground level), so a dark background does not dilute it."""
    lo = _percentile(square, percentiles[0])
    head = square[square > level] if level is not None else square
    if head.size < 0.01 * square.size:
        head = square
    return lo, _percentile(head, percentiles[1])


def _percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (its default linear method, the same arithmetic) from one partition
    around the two order statistics it needs, without numpy's general machinery (half the time)."""
    flat = values.reshape(-1)
    index = q / 100.0 * (flat.size - 1)
    below = int(np.floor(index))
    above = min(below + 1, flat.size - 1)
    part = np.partition(flat, [below, above] if above != below else below)
    a, b, t = part[below], part[above], index - below
    return float(b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t)


def _crop_square(img: np.ndarray, box: tuple[float, float, float], size: int, interpolation: int,
                 background: float = 0.0) -> np.ndarray:
    """The square ``box`` of ``img`` (``background`` outside the image) resized to ``size``: one pass.
    Area interpolation resizes the cropped square (a view when it lies inside the image; padded
    when it does not: warpAffine has no area mode)."""
    x, y, side = box
    h, w = img.shape
    if interpolation == cv2.INTER_AREA and side > size:
        xi, yi, si = int(np.floor(x)), int(np.floor(y)), int(np.ceil(side))
        crop = img[max(yi, 0) : min(yi + si, h), max(xi, 0) : min(xi + si, w)]
        top, left = max(-yi, 0), max(-xi, 0)
        bottom, right = max(si - top - crop.shape[0], 0), max(si - left - crop.shape[1], 0)
        if top or bottom or left or right:
            crop = cv2.copyMakeBorder(crop, top, bottom, left, right, cv2.BORDER_CONSTANT, value=background)
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    scale = size / side
    matrix = np.array([[scale, 0.0, -x * scale], [0.0, scale, -y * scale]], dtype=np.float64)
    flags = cv2.INTER_LINEAR if interpolation == cv2.INTER_AREA else interpolation
    return cv2.warpAffine(img, matrix, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=background)


def frame(gray: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Framing]:
    """Decoded 2-D slice -> (the ``[size, size]`` float32 intensity image before normalisation,
    where it lies in the slice).

    The slice is never copied whole: crops and resizes read it as it is (outside it: its minimum),
    and its min-max scaling to [0, 1] is applied to the small squares they make, which is the same
    (linear) arithmetic in another order."""
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    g = gray if gray.dtype == np.float32 else np.asarray(gray, dtype=np.float32)
    lo, hi = float(g.min()), float(g.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:  # a flat (or non-finite) slice is all zeros
        g, lo, k = np.zeros_like(g), 0.0, 1.0
    else:
        k = 1.0 / (hi - lo)
    interpolation = _INTERPOLATIONS[spec.interpolation]
    h, w = g.shape
    level: float | None = None
    if spec.version == 1 or (spec.crop == "none" and spec.aspect == "squash"):
        square = cv2.resize(g, (spec.size, spec.size), interpolation=interpolation)
        framing = Framing(0.0, 0.0, float(w), height=float(h))
        square = (square - np.float32(lo)) * np.float32(k)
        if spec.intensity == "head-percentiles":
            level = _head_region(cv2.resize(square, (MASK_SIDE, MASK_SIDE), interpolation=cv2.INTER_AREA))[1]
    else:
        if spec.crop == "head":
            box, level = _find_head(g, lo, k, spec.head_margin)
        else:  # the whole image, padded to a square
            side = float(max(w, h)) * (1.0 + 2.0 * spec.head_margin)
            box = ((w - side) / 2.0, (h - side) / 2.0, side)
        square = (_crop_square(g, box, spec.size, interpolation, lo) - np.float32(lo)) * np.float32(k)
        framing = Framing(*box, head_found=level is not None if spec.crop == "head" else None)
    if spec.intensity == "head-percentiles":
        p_lo, p_hi = _percentile_window(square, level, spec.percentiles)
        span = p_hi - p_lo if p_hi > p_lo else 1.0
        square = np.clip((square - p_lo) * np.float32(1.0 / span), 0.0, 1.0)
    return square.astype(np.float32, copy=False), framing


def normalise(unit: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """``[size, size]`` in [0, 1] -> ``[channels, size, size]`` normalised with the spec's mean / std."""
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    inv_std = (1.0 / np.asarray(spec.std, dtype=np.float32))[:, None, None]
    return np.ascontiguousarray((unit[None] - mean) * inv_std, dtype=np.float32)


def preprocess_framed(gray: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Framing]:
    """Decoded 2-D slice -> (float32 ``[channels, size, size]``, where the input lies in the slice)."""
    unit, framing = frame(gray, spec)
    return normalise(unit, spec), framing


def preprocess(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded 2-D slice (any real dtype and range) -> float32 ``[channels, size, size]``."""
    return preprocess_framed(gray, spec)[0]


@dataclass(frozen=True)
class OodSpec:
    """How to read the model's ``OOD_NAME`` output: a score above ``threshold`` means the input is
    unlike the training data (not a brain MR slice as the model knows them). ``method`` names how the
    score is computed in the graph; ``calibration`` says how the threshold was chosen (for people)."""

    threshold: float
    method: str = "mahalanobis"
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OodSpec:
        raw = json.loads(text)
        return cls(threshold=float(raw["threshold"]), method=str(raw.get("method", "mahalanobis")),
                   calibration=dict(raw.get("calibration", {})))


@dataclass(frozen=True)
class LocalisationSpec:
    """How to read the model's ``TUMOUR_MAP_NAME`` output: a pixel whose map probability is at least
    ``threshold`` belongs to the tumour region; a connected region smaller than ``min_area`` (a share
    of the model's input square, in [0, 1]) is not reported."""

    threshold: float = 0.5
    min_area: float = 0.001

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"localisation threshold {self.threshold!r} must lie in (0, 1)")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"localisation min_area {self.min_area!r} must lie in [0, 1)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LocalisationSpec:
        raw = json.loads(text)
        return cls(threshold=float(raw["threshold"]), min_area=float(raw["min_area"]))


# The names of planes and sequences the intended-use gate reads from a DICOM's headers
# (``app.core.acquisition`` has the rules).
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal", "oblique")
SEQUENCES: tuple[str, ...] = ("t1", "t1post", "t2", "flair", "other")


@dataclass(frozen=True)
class ValidatedUse:
    """What the model is validated for, as a DICOM's headers can say it (``app.core.acquisition``):
    slice planes and sequences. An MR DICOM whose headers say another plane or sequence is not
    assessed; one whose headers do not say is assessed with a warning. The model card states the
    same list. Names: planes ``axial``, ``coronal``, ``sagittal``, ``oblique``; sequences ``t1``
    (pre-contrast), ``t1post``, ``t2``, ``flair``, ``other``.

    ``specific_sequences``: those of ``sequences`` on which the tumour call was validated as specific
    too (tumour-free slices kept, not only tumours found); None means all of them. On a validated
    sequence outside it a tumour call carries a warning: there a tumour-free slice is often called
    tumour, so the answer is the likely type of a tumour, not evidence that there is one."""

    planes: tuple[str, ...] = ("axial",)
    sequences: tuple[str, ...] = ("t1post", "flair")
    specific_sequences: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [p for p in self.planes if p not in PLANES] + [s for s in self.sequences if s not in SEQUENCES]
        if unknown:
            raise ValueError(f"unknown plane or sequence names in the validated use: {unknown}")
        if self.specific_sequences is None:  # all of them: equal to the same use spelt out
            object.__setattr__(self, "specific_sequences", self.sequences)
        if not set(self.specific) <= set(self.sequences):
            raise ValueError("specific_sequences must be validated sequences: "
                             f"{sorted(set(self.specific) - set(self.sequences))}")

    @property
    def specific(self) -> tuple[str, ...]:
        """The validated sequences on which a tumour call is specific (never None after init)."""
        return self.specific_sequences or ()

    def to_json(self) -> str:
        return json.dumps({"planes": list(self.planes), "sequences": list(self.sequences),
                           "specific_sequences": list(self.specific)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ValidatedUse:
        raw = json.loads(text)
        specific = raw.get("specific_sequences")
        return cls(planes=tuple(raw["planes"]), sequences=tuple(raw["sequences"]),
                   specific_sequences=None if specific is None else tuple(specific))


# Release 1.2.0's validated use (models/MODEL_CARD.md, "Intended use"): axial T1 post-contrast
# (figshare-cheng) and FLAIR (lgg-tcga-flair) slices. SARTAJ's and Br35H's sequences are not labelled,
# so they add none; T1 pre-contrast and T2 slices were never labelled as such in training: not validated.
# Its tumour call is specific on FLAIR only: it kept 26 of 188 tumour-free T1 post-contrast slices of
# the LGG test patients (the model card's per-sequence table). Models whose metadata has no
# ``META_VALIDATED`` (1.2.x and older) get this list.
DEFAULT_VALIDATED = ValidatedUse(specific_sequences=("flair",))


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the service reads from ``metadata_props``; written by the exporter."""

    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    cam_weight: str
    cam_bias: str
    temperature: float = 1.0
    tumour_threshold: float = 0.5
    model_name: str = "btd-resnet50"
    model_version: str = "0.0.0"
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    ood: OodSpec | None = None
    validated: ValidatedUse = DEFAULT_VALIDATED
    localisation: LocalisationSpec | None = None  # with the ``TUMOUR_MAP_NAME`` output: the tumour region

    def to_props(self) -> dict[str, str]:
        ood = {META_OOD: self.ood.to_json()} if self.ood is not None else {}
        localisation = {META_LOCALISATION: self.localisation.to_json()} if self.localisation is not None else {}
        return {
            **ood,
            **localisation,
            META_VALIDATED: self.validated.to_json(),
            META_CONTRACT: CONTRACT_VERSION,
            META_LABELS: json.dumps(list(self.labels)),
            META_PREPROCESS: self.preprocess.to_json(),
            META_CAM_WEIGHT: self.cam_weight,
            META_CAM_BIAS: self.cam_bias,
            META_TEMPERATURE: repr(float(self.temperature)),
            META_THRESHOLD: repr(float(self.tumour_threshold)),
            META_NAME: self.model_name,
            META_VERSION: self.model_version,
            META_TRAINING_DATA: json.dumps(self.training_data, sort_keys=True),
            META_METRICS: json.dumps(self.metrics, sort_keys=True),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelMetadata:
        """Parse metadata_props; raises ValueError naming the missing or bad key."""
        version = props.get(META_CONTRACT)
        if version != CONTRACT_VERSION:
            raise ValueError(f"model contract version {version!r}, expected {CONTRACT_VERSION!r}")
        try:
            labels = tuple(json.loads(props[META_LABELS]))
            if len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
                raise ValueError(f"{META_LABELS} must list at least two class names")
            return cls(
                labels=labels,
                preprocess=PreprocessSpec.from_json(props[META_PREPROCESS]),
                cam_weight=props[META_CAM_WEIGHT],
                cam_bias=props[META_CAM_BIAS],
                temperature=float(props.get(META_TEMPERATURE, "1.0")),
                tumour_threshold=float(props.get(META_THRESHOLD, "0.5")),
                model_name=props.get(META_NAME, "unnamed"),
                model_version=props.get(META_VERSION, "0.0.0"),
                training_data=json.loads(props.get(META_TRAINING_DATA, "{}")),
                metrics=json.loads(props.get(META_METRICS, "{}")),
                ood=OodSpec.from_json(props[META_OOD]) if META_OOD in props else None,
                validated=ValidatedUse.from_json(props[META_VALIDATED]) if META_VALIDATED in props
                else DEFAULT_VALIDATED,
                localisation=LocalisationSpec.from_json(props[META_LOCALISATION]) if META_LOCALISATION in props
                else None,
            )
        except KeyError as exc:
            raise ValueError(f"model metadata lacks {exc.args[0]}") from None
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"model metadata is malformed: {exc}") from None
