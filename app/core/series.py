"""A series (a stack of slices of one acquisition) and its one finding.

The clinical unit is the series: a PACS routing rule sends one, a NIfTI file holds one. Its slices are
classified one by one (each a :class:`~app.core.result.Prediction`, gated as a single image is) and
this module turns those into the one answer the reader gets: tumour suspected or not, the most likely
class, a series tumour probability, and the key slices that support it.

Interface shared by the HTTP route (``POST /v1/predict/series``), the CLI (``btd predict --series``)
and the PACS transports; the aggregation rule is documented on :func:`aggregate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field

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


# --- slice order (issue 24, part 1: the PACS transports) ---------------------------------------------
# A simple ordering written before series-core's; the lead keeps one of the two when merging.


@dataclass(frozen=True)
class SliceGeometry:
    """Where a slice lies, from its DICOM header: Image Position (Patient), Image Orientation (Patient),
    Instance Number; each None when the header does not say."""

    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    instance_number: int | None = None


def slice_normal(orientation: Sequence[float]) -> tuple[float, float, float]:
    """The normal of a slice (row cosine x column cosine), pointing as DICOM's patient axes do."""
    r, c = orientation[:3], orientation[3:]
    return (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])


def order_slices(slices: Sequence[SliceGeometry]) -> list[int]:
    """The indices of ``slices`` in slice order: by position along the slice normal (the first oriented
    slice's) when every slice has a position and some slice an orientation; else by Instance Number
    (those without one last). Ties keep the order given (arrival), so the order is deterministic."""
    oriented = next((s.orientation for s in slices if s.orientation is not None), None)
    if oriented is not None and all(s.position is not None for s in slices):
        normal = slice_normal(oriented)
        along = [sum(p * n for p, n in zip(s.position, normal)) for s in slices]  # type: ignore[arg-type]
        return sorted(range(len(slices)), key=lambda i: (along[i], slices[i].instance_number or 0))
    return sorted(range(len(slices)), key=lambda i: (slices[i].instance_number is None, slices[i].instance_number or 0))
