"""A series (a stack of slices of one acquisition) and its one finding.

The clinical unit is the series: a PACS routing rule sends one, a NIfTI file holds one. Its slices are
classified one by one (each a :class:`~app.core.result.Prediction`, gated as a single image is) and
this module turns those into the one answer the reader gets: tumour suspected or not, the most likely
class, a series tumour probability, and the key slices that support it.

Interface shared by the HTTP route (``POST /v1/predict/series``), the CLI (``btd predict --series``)
and the PACS transports; the aggregation rule is documented on :func:`aggregate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field

from app.core.acquisition import frame_numbers
from app.core.result import ModelIdentity, Prediction


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


def aggregate(predictions: Sequence[Prediction]) -> SeriesFinding:
    """One finding from the slices' predictions, given in slice order. The rule is defined here."""
    raise NotImplementedError("series aggregation: see issue 24")


# The slice order below is series-core's (branch series-core, app/core/series.py), copied unchanged so
# that the PACS transports use the same names and signatures; the merge keeps one copy.

PARALLEL_COS = 0.99  # slice normals within ~8 degrees of each other count as one stack

Ordering = Literal["position", "instance-number", "received"]
ORDERING_WARNINGS = {  # said in the answer when the slices could not be placed along the normal
    "instance-number": "the slices were ordered by Instance Number (then frame): their headers give no usable "
                       "positions along one slice normal, so neighbours in the series may not be neighbours in space",
    "received": "the slices are in the order received: their headers give neither usable positions nor Instance "
                "Numbers, so neighbours in the series may not be neighbours in space",
}


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
