"""What the DICOM results say, as one typed value, and the ONE adapter from the inference result to it.

Everything DICOM-side (``app.transports.pacs.results``, the listener, the API's DICOM answers, the CLI) reads a
:class:`Finding`; only :func:`finding_from_result` knows the shape of the prediction result, so a
change of that shape is a change here and nowhere else.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Finding:
    """One classified slice. ``in_distribution`` is None for a model without an OOD score; when it is
    False the results report no finding. ``overlay`` is the CAM blended on the slice (RGB uint8, at
    the slice's aspect), or None."""

    model: ModelIdentity
    label: str
    probabilities: Mapping[str, float]
    tumour_probability: float | None
    tumour_detected: bool | None
    threshold: float
    in_distribution: bool | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    overlay: np.ndarray | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.probabilities)

    @property
    def reportable(self) -> bool:
        """False when the input is unlike the training data: then there is no finding to report."""
        return self.in_distribution is not False


def _png_rgb(b64: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    if image is None:  # pragma: no cover - the service encodes these PNGs itself
        raise ValueError("the CAM overlay PNG could not be decoded")
    return np.ascontiguousarray(image[:, :, ::-1])


def finding_from_result(result: Mapping[str, Any]) -> Finding:
    """The prediction result of ``POST /v1/predict`` (or ``Predictor.predict``), ``cam=png`` for an
    overlay, as a :class:`Finding`. Models from 1.2.0 add ``in_distribution`` / ``ood_score``."""
    model = result["model"]
    cam = result.get("cam") or {}
    return Finding(
        model=ModelIdentity(str(model["name"]), str(model["version"]), str(model["sha256"])),
        label=str(result["label"]),
        probabilities={str(k): float(v) for k, v in result["probabilities"].items()},
        tumour_probability=None if result.get("tumour_probability") is None else float(result["tumour_probability"]),
        tumour_detected=result.get("tumour_detected"),
        threshold=float(result["threshold"]),
        in_distribution=result.get("in_distribution"),
        ood_score=None if result.get("ood_score") is None else float(result["ood_score"]),
        ood_threshold=None if result.get("ood_threshold") is None else float(result["ood_threshold"]),
        overlay=_png_rgb(cam["overlay_png"]) if cam.get("format") == "png" else None,
    )
