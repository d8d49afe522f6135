"""The inference core shared by the HTTP service and the local ``Predictor``: pure steps
around the model call. decode -> preprocess (``prepare``), then the model (batched or not),
then softmax with temperature, tumour decision, CAM and encoding (``ResultBuilder.build``).
No FastAPI, no ONNX Runtime here: the model call is the caller's business."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from app.contract import ModelMetadata, PreprocessSpec, preprocess
from app.errors import InvalidImage
from app.inference.decode import DEFAULT_MAX_PIXELS, MultiframePolicy, decode
from app.inference.postprocess import (
    cam_grid,
    cam_images,
    class_activation_map,
    gray_view,
    softmax,
    tumour_probability,
)

CamMode = Literal["none", "png", "grid"]
CAM_MODES: tuple[str, ...] = get_args(CamMode)
SMALL_IMAGE_SIDE = 64  # below this many pixels on the short side, warn: upsampled a lot


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@dataclass
class Prepared:
    """A request after decode and preprocess, ready for the model."""

    tensor: np.ndarray  # float32 [channels, size, size]
    gray: np.ndarray  # the decoded slice, kept for the CAM images
    media_type: str
    warnings: list[str]
    timings_ms: dict[str, float] = field(default_factory=dict)


def prepare(data: bytes, media_type: str | None, spec: PreprocessSpec, *,
            max_pixels: int = DEFAULT_MAX_PIXELS, multiframe: MultiframePolicy = "middle") -> Prepared:
    """Bytes -> model input. Raises the typed errors of ``app.errors`` for bad input."""
    start = time.perf_counter()
    decoded = decode(data, media_type, max_pixels=max_pixels, multiframe=multiframe)
    decode_ms = ms_since(start)
    start = time.perf_counter()
    if not np.isfinite(decoded.pixels).all():
        raise InvalidImage("the image contains non-finite values")
    tensor = preprocess(decoded.pixels, spec)
    warnings = list(decoded.warnings)
    if min(decoded.pixels.shape) < SMALL_IMAGE_SIDE:
        warnings.append(f"the image is small ({decoded.pixels.shape[1]}x{decoded.pixels.shape[0]}); "
                        f"it was upsampled to {spec.size}x{spec.size}")
    return Prepared(tensor, decoded.pixels, decoded.media_type, warnings,
                    {"decode": decode_ms, "preprocess": ms_since(start)})


@dataclass(frozen=True)
class ResultBuilder:
    """Model outputs of one image -> the response dict (the HTTP response minus ``request_id``)."""

    metadata: ModelMetadata
    cam_weights: np.ndarray  # float32 [C, K]
    sha256: str
    threshold: float

    @property
    def model_identity(self) -> dict[str, str]:
        return {"name": self.metadata.model_name, "version": self.metadata.model_version, "sha256": self.sha256}

    def build(self, prepared: Prepared, logits: np.ndarray, features: np.ndarray, cam: str, *,
              started: float, queue_ms: float, inference_ms: float) -> dict[str, Any]:
        """``logits`` ``[C]``, ``features`` ``[K, h, w]`` of this image; ``started`` is the
        ``time.perf_counter()`` when the request's processing began (for the total)."""
        labels = self.metadata.labels
        probs = softmax(logits, self.metadata.temperature)
        best = int(np.argmax(probs))
        tumour = tumour_probability(probs, labels)
        cam_start = time.perf_counter()
        cam_out: dict[str, Any] | None = None
        if cam != "none":
            grid = class_activation_map(features, self.cam_weights, best)
            cam_out = cam_grid(grid) if cam == "grid" else cam_images(gray_view(prepared.gray), grid)
            cam_out["label"] = labels[best]
        timings = {
            **prepared.timings_ms,
            "queue": queue_ms,
            "inference": inference_ms,
            "cam": ms_since(cam_start) if cam != "none" else 0.0,
        }
        timings["total"] = ms_since(started)
        return {
            "model": self.model_identity,
            "label": labels[best],
            "probabilities": {label: float(p) for label, p in zip(labels, probs)},
            "tumour_probability": tumour,
            "tumour_detected": None if tumour is None else bool(tumour >= self.threshold),
            "threshold": float(self.threshold),
            "cam": cam_out,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            "warnings": prepared.warnings,
        }


def check_cam_mode(cam: str) -> str:
    if cam not in CAM_MODES:
        raise ValueError(f"cam must be one of {', '.join(CAM_MODES)}")
    return cam
