"""Training augmentations on the decoded float gray slice, applied before ``app.contract.preprocess``.

Each step is named for what it does. Real scans differ from the training copy in size,
field of view, windowing and noise, so the steps change exactly those. ``preprocess`` rescales
every image by its own min/max, which undoes any purely linear brightness/contrast change:
the intensity steps here are therefore the non-linear ones (windowing with clipping, gamma).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from app.contract import scale_intensity

_INTERPOLATIONS = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST)


@dataclass(frozen=True)
class AugmentConfig:
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    horizontal_flip: float = 0.5  # probability; left/right brain flips keep the label
    vertical_flip: float = 0.0
    window_clip: float = 0.08  # up to this fraction of the range clipped at each end (brightness/contrast)
    gamma_range: tuple[float, float] = (0.7, 1.4)
    noise_std: float = 0.03  # Gaussian noise, fraction of the range
    resolution_range: tuple[float, float] = (0.35, 1.0)  # down-sample to this fraction, then back up
    resolution_probability: float = 0.5
    crop_border: float = 0.1  # crop up to this fraction per side, or pad with black by as much

    def to_dict(self) -> dict:
        return asdict(self)


def random_rotation_and_scaling(img: np.ndarray, rng: np.random.Generator, degrees: float,
                                scale_range: tuple[float, float]) -> np.ndarray:
    h, w = img.shape
    angle = rng.uniform(-degrees, degrees)
    scale = rng.uniform(*scale_range)
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0.0)


def random_flips(img: np.ndarray, rng: np.random.Generator, horizontal: float, vertical: float) -> np.ndarray:
    if rng.random() < horizontal:
        img = img[:, ::-1]
    if rng.random() < vertical:
        img = img[::-1, :]
    return np.ascontiguousarray(img)


def random_window(img: np.ndarray, rng: np.random.Generator, max_clip: float) -> np.ndarray:
    """Brightness/contrast as a display window would change them: clip a random share of the
    range at the dark and bright ends, then stretch back to [0, 1]."""
    lo = rng.uniform(0.0, max_clip)
    hi = 1.0 - rng.uniform(0.0, max_clip)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def random_gamma(img: np.ndarray, rng: np.random.Generator, gamma_range: tuple[float, float]) -> np.ndarray:
    gamma = math.exp(rng.uniform(math.log(gamma_range[0]), math.log(gamma_range[1])))
    return np.power(np.clip(img, 0.0, 1.0), gamma).astype(np.float32)


def random_noise(img: np.ndarray, rng: np.random.Generator, max_std: float) -> np.ndarray:
    std = rng.uniform(0.0, max_std)
    return (img + rng.normal(0.0, std, img.shape)).astype(np.float32)


def random_resolution_change(img: np.ndarray, rng: np.random.Generator,
                             fraction_range: tuple[float, float]) -> np.ndarray:
    """Down-sample then up-sample with random interpolations: scans come at many resolutions."""
    h, w = img.shape
    fraction = rng.uniform(*fraction_range)
    small = (max(8, round(w * fraction)), max(8, round(h * fraction)))
    down = cv2.resize(img, small, interpolation=_INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))])
    return cv2.resize(down, (w, h), interpolation=_INTERPOLATIONS[rng.integers(1, len(_INTERPOLATIONS))])


def random_crop_or_border(img: np.ndarray, rng: np.random.Generator, max_fraction: float) -> np.ndarray:
    """Crop each side by up to ``max_fraction`` (tighter field of view) or pad it with black (wider)."""
    h, w = img.shape
    sides = rng.uniform(-max_fraction, max_fraction, 4) * np.array([h, h, w, w])
    top, bottom, left, right = (round(float(v)) for v in sides)
    crop = img[max(top, 0) : h - max(bottom, 0), max(left, 0) : w - max(right, 0)]
    if crop.shape[0] < 8 or crop.shape[1] < 8:
        return img
    pads = [max(-top, 0), max(-bottom, 0), max(-left, 0), max(-right, 0)]
    return cv2.copyMakeBorder(crop, *pads, borderType=cv2.BORDER_CONSTANT, value=0.0)


class Augment:
    """The training augmentation pipeline: gray slice (any range) -> augmented gray in [0, 1]-ish."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        img = scale_intensity(gray)
        img = random_crop_or_border(img, rng, c.crop_border)
        img = random_rotation_and_scaling(img, rng, c.rotation_degrees, c.scale_range)
        img = random_flips(img, rng, c.horizontal_flip, c.vertical_flip)
        if rng.random() < c.resolution_probability:
            img = random_resolution_change(img, rng, c.resolution_range)
        img = random_window(img, rng, c.window_clip)
        img = random_gamma(img, rng, c.gamma_range)
        return random_noise(img, rng, c.noise_std)
