"""The model contract: the only thing training/export and the service share.

One place for each fact that crosses the ONNX file: tensor names, metadata keys, the
preprocessing spec and the preprocessing function itself. Training's evaluation transform,
the exporter and the service all call :func:`preprocess`, so the tensor a model sees in
evaluation is the tensor it sees in production.

Imports numpy and OpenCV only (no torch, no FastAPI), so both sides can use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import cv2
import numpy as np

CONTRACT_VERSION = "1"

# ONNX graph input / output names.
INPUT_NAME = "image"
LOGITS_NAME = "logits"
FEATURES_NAME = "features"

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

# The label meaning "no tumour"; tumour probability is 1 - p(this label) when present.
NO_TUMOUR_LABEL = "notumor"

_INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded 2-D grayscale slice becomes the model's input tensor.

    Steps, in order: intensity scaling to [0, 1] ("minmax": per image, so 8-bit, 16-bit and
    windowed DICOM inputs land on one scale), resize to ``size`` (squash, no letterbox) with
    ``interpolation``, replicate to ``channels`` channels, normalise with ``mean`` / ``std``.
    """

    size: int = 224
    interpolation: str = "area"
    intensity: str = "minmax"
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.intensity != "minmax":
            raise ValueError(f"unknown intensity scaling {self.intensity!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.size <= 0:
            raise ValueError("size must be positive")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        raw = json.loads(text)
        raw["mean"] = tuple(raw["mean"])
        raw["std"] = tuple(raw["std"])
        return cls(**raw)


def scale_intensity(gray: np.ndarray) -> np.ndarray:
    """Scale a 2-D image to [0, 1] in float32 by its own min and max (a flat image gives 0)."""
    g = np.asarray(gray, dtype=np.float32)
    lo = float(g.min())
    hi = float(g.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(g, dtype=np.float32)
    return (g - lo) * np.float32(1.0 / (hi - lo))


def preprocess(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded 2-D slice (any real dtype and range) -> float32 ``[channels, size, size]``."""
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    unit = scale_intensity(gray)
    resized = cv2.resize(unit, (spec.size, spec.size), interpolation=_INTERPOLATIONS[spec.interpolation])
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    chw = np.broadcast_to(resized, (spec.channels, spec.size, spec.size))
    return np.ascontiguousarray((chw - mean) / std, dtype=np.float32)


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

    def to_props(self) -> dict[str, str]:
        return {
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
    def from_props(cls, props: Mapping[str, str]) -> "ModelMetadata":
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
            )
        except KeyError as exc:
            raise ValueError(f"model metadata lacks {exc.args[0]}") from None
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"model metadata is malformed: {exc}") from None
