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
