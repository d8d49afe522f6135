"""The one decision: the model's outputs for an image (logits, out-of-distribution score) and what
the image itself says (reasons read from its pixels or headers) -> the class, the calibrated
probabilities, the tumour probability and whether a tumour is called.

Every answer goes through here: ``/v1`` and the web page (``Prediction``), the Open Inference
Protocol's audit lines, the PACS results (built from ``Prediction``), ``btd predict``, the metrics and
the evaluation of a model (which calls :func:`tumour_probability` and :func:`calls_tumour` on whole
arrays). A rule written here once cannot drift between transports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.core.contract import NO_TUMOUR_LABEL

# The label of an answer that makes no finding (out of distribution) where answers are counted by
# label (the metrics, the class mix of drift): never counted as a class.
NOT_ASSESSED = "not_assessed"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities: softmax(logits / T) in float64 (sums to 1), along the last axis."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def tumour_probability(probabilities: np.ndarray, labels: Sequence[str]):
    """1 - p(no tumour) along the last axis (a float for one image, an array for several), or None
    when the model has no no-tumour class."""
    if NO_TUMOUR_LABEL not in labels:
        return None
    p = 1.0 - np.asarray(probabilities, dtype=np.float64)[..., list(labels).index(NO_TUMOUR_LABEL)]
    return float(p) if p.ndim == 0 else p


def calls_tumour(tumour: float | np.ndarray, threshold: float):
    """Whether a tumour is called: tumour probability at or over the model's threshold."""
    return tumour >= threshold


@dataclass(frozen=True)
class Decision:
    label: str
    probabilities: dict[str, float]
    tumour_probability: float | None
    tumour_detected: bool | None  # None: the model cannot say (no no-tumour class) or the image is not assessed
    threshold: float
    in_distribution: bool | None  # False: not assessed; None: nothing could say (no OOD output, no rule fired)
    ood_reasons: list[str] = field(default_factory=list)
    ood_score: float | None = None
    ood_threshold: float | None = None

    @property
    def assessed(self) -> bool:
        return self.in_distribution is not False


def decide(logits: np.ndarray, labels: Sequence[str], *, temperature: float, threshold: float,
           ood_score: float | None = None, ood_threshold: float | None = None,
           image_reasons: Sequence[str] = ()) -> Decision:
    """One image's ``[C]`` logits -> its ``Decision``. Out of distribution when the model's score is
    over its threshold (reason ``model``, listed first) or the image gave reasons of its own
    (``modality``; ``plane`` and ``sequence``, the intended-use gate on a DICOM's headers; ``no-head``,
    ``small-image``): then no tumour decision is made."""
    probabilities = softmax(np.asarray(logits).reshape(-1), temperature)
    tumour = tumour_probability(probabilities, labels)
    reasons = list(image_reasons)
    if ood_score is not None and ood_threshold is not None and ood_score > ood_threshold:
        reasons.insert(0, "model")
    in_distribution = False if reasons else (True if ood_score is not None else None)
    return Decision(
        label=labels[int(np.argmax(probabilities))],
        probabilities={label: float(p) for label, p in zip(labels, probabilities)},
        tumour_probability=tumour,
        tumour_detected=None if tumour is None or in_distribution is False else bool(calls_tumour(tumour, threshold)),
        threshold=float(threshold),
        in_distribution=in_distribution,
        ood_reasons=reasons,
        ood_score=None if ood_score is None else float(ood_score),
        ood_threshold=None if ood_threshold is None else float(ood_threshold),
    )
