"""A series (a stack of slices of one acquisition) and its one finding.

The clinical unit is the series: a PACS routing rule sends one, a NIfTI file holds one. Its slices are
classified one by one (each a :class:`~app.core.result.Prediction`, gated as a single image is) and
this module turns those into the one answer the reader gets: tumour suspected or not, the most likely
class, a series tumour probability, and the key slices that support it.

Interface shared by the HTTP route (``POST /v1/predict/series``), the CLI (``btd predict --series``)
and the PACS transports; the aggregation rule is documented on :func:`aggregate`, the slice order on
:func:`order_slices`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from app.core.acquisition import frame_numbers
from app.core.contract import NO_TUMOUR_LABEL
from app.core.errors import BadRequest, PayloadTooLarge
from app.core.result import ModelIdentity, Prediction, not_specific_warnings

# The aggregation rule's one parameter: consecutive assessed slices that must all be over the slice
# threshold. Chosen by measurement (bench/series_rule.py, README "Series"): 1 (any slice) calls most
# tumour-free series tumour, 3 misses small lesions.
SERIES_MIN_RUN = 2
MAX_KEY_SLICES = 5  # the key slices a finding names (a Key Object Selection a reader opens)
PARALLEL_COS = 0.99  # slice normals within ~8 degrees of each other count as one stack

Ordering = Literal["position", "instance-number", "received"]
ORDERING_WARNINGS = {  # said in the answer when the slices could not be placed along the normal
    "instance-number": "the slices were ordered by Instance Number (then frame): their headers give no usable "
                       "positions along one slice normal, so neighbours in the series may not be neighbours in space",
    "received": "the slices are in the order received: their headers give neither usable positions nor Instance "
                "Numbers, so neighbours in the series may not be neighbours in space",
}


@dataclass(frozen=True)
class SeriesFinding:
    """The series-level answer built from its slices' predictions."""

    model: ModelIdentity
    assessed: Annotated[bool, Field(description="false when no slice of the series was assessed")]
    tumour_detected: Annotated[bool | None, Field(description="null when the series was not assessed")]
    tumour_probability: Annotated[float | None, Field(description="the series tumour probability (see the rule)")]
    label: Annotated[str | None, Field(description="the most likely class of the series; null when not assessed")]
    threshold: float
    key_slices: Annotated[list[int], Field(description="indices (in slice order) of the slices that support the finding")]
    slices_assessed: int
    slices_not_assessed: int
    not_assessed_reasons: Annotated[dict[str, int], Field(description="reason -> number of slices")] = field(
        default_factory=dict)
    rule: Annotated[str, Field(description="the aggregation rule, in words")] = ""
    min_run: Annotated[int, Field(description="consecutive assessed slices over the threshold the rule needs")] = (
        SERIES_MIN_RUN)


# --------------------------------------------------------------------------------------- aggregation

def rule_words(min_run: int = SERIES_MIN_RUN) -> str:
    return (f"tumour when {min_run} consecutive assessed slices (not-assessed slices skipped) all have a tumour "
            "probability at or over the threshold; the series tumour probability is the highest, over every run "
            f"of {min_run} consecutive assessed slices, of the run's lowest slice probability (a series with fewer "
            "assessed slices: their lowest); key slices: the tumour slices of the best run's stretch, the most "
            f"probable {MAX_KEY_SLICES}; label: the tumour class with the largest sum of slice probabilities over "
            "the tumour slices, else notumor; not assessed when no slice is")


def series_probability(probabilities: Sequence[float], min_run: int = SERIES_MIN_RUN) -> tuple[float, int]:
    """(the highest over windows of ``min_run`` consecutive values of the window's lowest value, where
    the best window starts). Fewer values than ``min_run``: the window is all of them."""
    width = max(1, min(min_run, len(probabilities)))
    best, start = -math.inf, 0
    for i in range(len(probabilities) - width + 1):
        low = min(probabilities[i:i + width])
        if low > best:
            best, start = low, i
    return best, start


def aggregate(predictions: Sequence[Prediction], *, min_run: int = SERIES_MIN_RUN) -> SeriesFinding:
    """One finding from the slices' predictions, given in slice order.

    The rule (``rule_words``): a slice CNN's false positives are isolated (one odd slice: a vessel, the
    skull base), a tumour spans several adjacent slices, so the series is called tumour when ``min_run``
    consecutive assessed slices are all over the slice threshold. The series probability is the figure
    that decision thresholds: the best such run's lowest probability, so ``tumour_detected`` is exactly
    ``tumour_probability >= threshold``. Slices not assessed (outside the validated use, out of
    distribution) carry no evidence and are skipped, not counted as tumour-free; their reasons are counted.
    """
    if not predictions:
        raise ValueError("a series needs at least one slice")
    first = predictions[0]
    reasons: Counter[str] = Counter(r for p in predictions if not p.assessed for r in (p.ood_reasons or ["unknown"]))
    assessed = [(i, p) for i, p in enumerate(predictions) if p.assessed]
    common: dict[str, Any] = {"model": first.model, "threshold": first.threshold, "slices_assessed": len(assessed),
                              "slices_not_assessed": len(predictions) - len(assessed),
                              "not_assessed_reasons": dict(sorted(reasons.items())), "rule": rule_words(min_run),
                              "min_run": min_run}
    if not assessed:
        return SeriesFinding(assessed=False, tumour_detected=None, tumour_probability=None, label=None,
                             key_slices=[], **common)
    threshold = first.threshold
    if any(p.tumour_probability is None for _, p in assessed):  # a model without a notumor class: no finding
        return SeriesFinding(assessed=True, tumour_detected=None, tumour_probability=None,
                             label=_vote([p for _, p in assessed]), key_slices=[], **common)
    probs = [float(p.tumour_probability) for _, p in assessed]  # type: ignore[arg-type]
    probability, start = series_probability(probs, min_run)
    detected = probability >= threshold
    if not detected:
        return SeriesFinding(assessed=True, tumour_detected=False, tumour_probability=probability,
                             label=NO_TUMOUR_LABEL, key_slices=[], **common)
    # the stretch of consecutive assessed slices over the threshold that holds the best run
    lo, hi = start, start + max(1, min(min_run, len(probs))) - 1
    while lo > 0 and probs[lo - 1] >= threshold:
        lo -= 1
    while hi + 1 < len(probs) and probs[hi + 1] >= threshold:
        hi += 1
    stretch = sorted(range(lo, hi + 1), key=lambda j: -probs[j])[:MAX_KEY_SLICES]
    tumour_slices = [p for _, p in assessed if p.tumour_probability is not None and p.tumour_probability >= threshold]
    return SeriesFinding(assessed=True, tumour_detected=True, tumour_probability=probability,
                         label=_vote(tumour_slices, exclude=NO_TUMOUR_LABEL),
                         key_slices=sorted(assessed[j][0] for j in stretch), **common)


def _vote(predictions: Sequence[Prediction], exclude: str | None = None) -> str:
    """The class with the largest sum of slice probabilities (a probability-weighted vote)."""
    totals: Counter[str] = Counter()
    for p in predictions:
        for label, value in p.probabilities.items():
            if label != exclude:
                totals[label] += value
    return max(totals, key=lambda label: (totals[label], label))


# ------------------------------------------------------------------------------------------ ordering

@dataclass(frozen=True)
class SliceGeometry:
    """Where a slice (a single-frame instance, or one frame of an Enhanced MR) lies, from its headers."""

    instance_uid: str | None = None
    frame_number: int | None = None  # 1-based frame of a multi-frame instance (DICOM's numbering); None: single
    instance_number: int | None = None
    image_position: tuple[float, float, float] | None = None  # Image Position (Patient), mm
    normal: tuple[float, float, float] | None = None  # row x column direction of Image Orientation (Patient)


def normal_of(orientation: Sequence[float] | None) -> tuple[float, float, float] | None:
    """The unit slice normal (row cosines x column cosines) of Image Orientation (Patient)."""
    if orientation is None or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    length = math.sqrt(sum(v * v for v in n))
    return None if length < 0.5 else (n[0] / length, n[1] / length, n[2] / length)


def frame_geometries(ds: Any, instance_uid: str | None, instance_number: int | None) -> list[SliceGeometry]:
    """One geometry per frame of a dataset: Image Position / Orientation (Patient) at the top level, or
    (Enhanced MR) in each frame's Plane Position / Plane Orientation functional groups."""
    try:
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        frames = 1
    out = []
    for f in range(frames):
        position = frame_numbers(ds, "ImagePositionPatient", f)
        out.append(SliceGeometry(instance_uid, f + 1 if frames > 1 else None, instance_number,
                                 tuple(position) if position and len(position) == 3 else None,  # type: ignore[arg-type]
                                 normal_of(frame_numbers(ds, "ImageOrientationPatient", f))))
    return out


def order_slices(slices: Sequence[SliceGeometry]) -> tuple[list[int], list[float | None], Ordering]:
    """(indices of ``slices`` in slice order, each slice's position along the slice normal in mm (in
    the input's order; None where unknown), how they were ordered).

    By position along the normal (the dot product of Image Position (Patient) with the first slice's
    normal; ascending: feet to head for an axial stack) when every slice has a position and all
    normals are parallel; else by Instance Number (then frame number) when every slice has one; else
    as received (then frame number). A stack that mixes orientations is not ordered by position."""
    normal = next((s.normal for s in slices if s.normal is not None), None)
    positions: list[float | None] = [
        None if normal is None or s.image_position is None else sum(a * b for a, b in zip(s.image_position, normal))
        for s in slices]
    parallel = normal is not None and all(
        s.normal is not None and abs(sum(a * b for a, b in zip(s.normal, normal))) >= PARALLEL_COS for s in slices)
    if parallel and all(p is not None for p in positions):
        order = sorted(range(len(slices)), key=lambda i: (positions[i], slices[i].instance_number or 0,
                                                           slices[i].frame_number or 0))
        return order, positions, "position"
    if all(s.instance_number is not None for s in slices):
        order = sorted(range(len(slices)), key=lambda i: (slices[i].instance_number, slices[i].frame_number or 0))
        return order, positions, "instance-number"
    return list(range(len(slices))), positions, "received"


def plan_dicom_series(instances: Sequence[tuple[str, list[SliceGeometry]]],
                      max_slices: int) -> tuple[list[tuple[int, SliceGeometry, float | None]], Ordering]:
    """The slices of DICOM instances (each: its Series Instance UID and its frames' geometries), checked
    to be one series and ordered: ([(instance index, geometry, position)] in slice order, the ordering).
    400 for no instance or more than one Series Instance UID; 413 past ``max_slices``."""
    if not instances:
        raise BadRequest("the series has no DICOM instance")
    uids = {uid for uid, _ in instances}
    if len(uids) > 1:
        raise BadRequest(f"the instances belong to {len(uids)} series (Series Instance UID); send one series")
    if "" in uids:
        raise BadRequest("the instances have no Series Instance UID")
    flat = [(i, g) for i, (_, frames) in enumerate(instances) for g in frames]
    if len(flat) > max_slices:
        raise PayloadTooLarge(f"the series has {len(flat)} slices; at most {max_slices} (BTD_MAX_SERIES_SLICES)")
    order, positions, ordering = order_slices([g for _, g in flat])
    return [(flat[j][0], flat[j][1], None if positions[j] is None else round(positions[j], 3)) for j in order], ordering


@dataclass(frozen=True)
class SliceResult:
    """One slice's prediction and where it lies in the series."""

    index: Annotated[int, Field(description="the slice's place in slice order, from 0")]
    position: Annotated[float | None, Field(
        description="mm along the slice normal: DICOM, Image Position (Patient) projected on the normal of Image "
                    "Orientation (Patient); NIfTI, the slice's RAS z; null when the headers do not say")]
    instance_uid: Annotated[str | None, Field(description="the SOP Instance UID of a DICOM slice; null for NIfTI")]
    frame_number: Annotated[int | None, Field(
        description="the frame (from 1) of a multi-frame instance (Enhanced MR); null for a single-frame one")]
    result: Prediction


@dataclass(frozen=True)
class SeriesResult:
    """A series' slices and its finding: what ``POST /v1/predict/series`` and ``btd predict --series`` answer."""

    source: Annotated[Literal["dicom", "nifti"], Field(description="what the series came as")]
    ordering: Annotated[Ordering, Field(
        description="how the slices were ordered: position (along the slice normal), instance-number (the "
                    "headers give no usable positions: Instance Number, then frame), received (neither)")]
    finding: SeriesFinding
    slices: list[SliceResult]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _SERIES_RESULT.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesResult:
        """A response body (a remote service's) back into the typed result (validated)."""
        return _SERIES_RESULT.validate_python({k: v for k, v in data.items() if k != "request_id"})

    @classmethod
    def build(cls, source: Literal["dicom", "nifti"], ordering: Ordering,
              slices: Sequence[tuple[float | None, str | None, int | None, Prediction]],
              warnings: Sequence[str] = ()) -> SeriesResult:
        """The result of slices given in slice order as (position, instance UID, frame number, prediction)."""
        results = [SliceResult(i, pos, uid, frame, p) for i, (pos, uid, frame, p) in enumerate(slices)]
        said = [ORDERING_WARNINGS[ordering]] if ordering in ORDERING_WARNINGS else []
        finding = aggregate([r.result for r in results])
        # A tumour series carries its key slices' not-specific warning (the answer is read without its slices).
        key = [results[i].result for i in finding.key_slices] if finding.tumour_detected else []
        caveat = not_specific_warnings(key)
        return cls(source, ordering, finding, results, said + list(warnings) + caveat)


_SERIES_RESULT = TypeAdapter(SeriesResult)
