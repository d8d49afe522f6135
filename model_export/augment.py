"""Training augmentations on the decoded float gray slice, applied before ``app.core.contract.preprocess``.

Each step is named for what it does. They change what differs between scanners, sites and
exports of the same slice, so that "which collection does this look like" stops paying:

- geometry: field of view (crop or black border), rotation, scale, flips, aspect (squashed
  copies such as the 224x224 re-encoding), pixel size (the whole image resampled to a long side
  between about 128 and 512 pixels);
- acquisition: bias field (smooth multiplicative inhomogeneity), noise;
- display and export: contrast curves (gamma, sigmoid, random monotone curves), window clipping,
  blur and sharpening, JPEG re-compression at a random quality;
- sequence: the tissue contrast itself remapped inside the head (a random non-monotone curve, an
  inversion that makes fluid bright as on T2, or a random shallow convolution network, "global
  intensity non-linear" augmentation), so that which MR sequence a slice is stops telling the class:
  our tumours are T1 post-contrast or FLAIR, our tumour-free slices mostly other sequences, and we
  have no T2 at all.

``preprocess`` (version 2) crops to the head and maps its intensity percentiles to [0, 1], which
undoes borders, offsets, scale and any linear brightness / contrast change, so the intensity
steps here are the non-linear ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from app.core.contract import scale_intensity

_INTERPOLATIONS = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_NEAREST)


@dataclass(frozen=True)
class AugmentConfig:
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    horizontal_flip: float = 0.5  # probability; left/right brain flips keep the label
    vertical_flip: float = 0.0
    crop_border: float = 0.1  # crop up to this fraction per side, or pad with black by as much
    aspect_range: tuple[float, float] = (0.8, 1.25)  # width / height stretch
    aspect_probability: float = 0.5
    long_side_range: tuple[int, int] = (128, 512)  # pixel size: the image resampled to this long side
    resample_probability: float = 0.7
    bias_field_strength: float = 0.35  # max log-amplitude of the smooth multiplicative field
    bias_field_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.45)
    curve_probability: float = 0.5  # a sigmoid or random monotone contrast curve
    window_clip: float = 0.08  # up to this fraction of the range clipped at each end
    blur_sigma_range: tuple[float, float] = (0.4, 1.6)  # in pixels
    blur_probability: float = 0.25
    sharpen_amount_range: tuple[float, float] = (0.3, 1.5)  # unsharp mask
    sharpen_probability: float = 0.25
    noise_std: float = 0.04  # Gaussian or Rician noise, fraction of the range
    jpeg_quality_range: tuple[int, int] = (30, 95)
    jpeg_probability: float = 0.5
    sequence_probability: float = 0.4  # tissue contrast remapped (curve, inversion or random network)

    def to_dict(self) -> dict:
        return asdict(self)


# --- geometry -------------------------------------------------------------------------------------

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


def random_aspect(img: np.ndarray, rng: np.random.Generator, ratio_range: tuple[float, float]) -> np.ndarray:
    """Stretch one axis (log-uniform ratio): squashed copies, non-square pixels and matrices."""
    h, w = img.shape
    ratio = math.exp(rng.uniform(math.log(ratio_range[0]), math.log(ratio_range[1])))
    if ratio >= 1.0:
        size = (max(8, round(w * ratio)), h)
    else:
        size = (w, max(8, round(h / ratio)))
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)


def random_pixel_size(img: np.ndarray, rng: np.random.Generator, long_side_range: tuple[int, int]) -> np.ndarray:
    """Resample the whole image so its long side is log-uniform in ``long_side_range``, with a random
    interpolation: scans come at many matrix sizes, and up-sampled small ones are soft."""
    h, w = img.shape
    target = math.exp(rng.uniform(math.log(long_side_range[0]), math.log(long_side_range[1])))
    scale = target / max(h, w)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    interpolation = _INTERPOLATIONS[rng.integers(len(_INTERPOLATIONS))] if scale < 1 else \
        _INTERPOLATIONS[rng.integers(1, len(_INTERPOLATIONS))]
    return cv2.resize(img, size, interpolation=interpolation)


# --- acquisition ----------------------------------------------------------------------------------

def random_bias_field(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Multiply by a smooth field exp(f), f a bicubic up-sampling of a random 3x3..5x5 grid with values
    up to +-``strength``: the coil inhomogeneity every MR image has to some degree."""
    h, w = img.shape
    cells = int(rng.integers(3, 6))
    grid = rng.uniform(-strength, strength, (cells, cells)).astype(np.float32)
    field = np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), -strength, strength)
    return (img * np.exp(field)).astype(np.float32)


def random_noise(img: np.ndarray, rng: np.random.Generator, max_std: float) -> np.ndarray:
    """Gaussian noise, or Rician (the magnitude of a complex signal with Gaussian noise, as MR magnitude
    images have: it lifts the dark background), zero-mean for Gaussian, std up to ``max_std``."""
    std = rng.uniform(0.0, max_std)
    if rng.random() < 0.5:
        return (img + rng.normal(0.0, std, img.shape)).astype(np.float32)
    real = img + rng.normal(0.0, std, img.shape)
    imag = rng.normal(0.0, std, img.shape)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


# --- display and export ---------------------------------------------------------------------------

def robust_unit(img: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """[0, 1] by the minimum and a high percentile (clipped above): a few hot pixels or a noise spike
    must not compress the tissue into the dark end before the contrast steps."""
    lo = float(img.min())
    hi = float(np.percentile(img, percentile))
    if hi <= lo:
        return scale_intensity(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def random_window(img: np.ndarray, rng: np.random.Generator, max_clip: float) -> np.ndarray:
    """Brightness/contrast as a display window would change them: clip a random share of the
    range at the dark and bright ends, then stretch back to [0, 1]."""
    lo = rng.uniform(0.0, max_clip)
    hi = 1.0 - rng.uniform(0.0, max_clip)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def random_gamma(img: np.ndarray, rng: np.random.Generator, gamma_range: tuple[float, float]) -> np.ndarray:
    gamma = math.exp(rng.uniform(math.log(gamma_range[0]), math.log(gamma_range[1])))
    return np.power(np.clip(img, 0.0, 1.0), gamma).astype(np.float32)


def random_contrast_curve(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A monotone intensity curve on [0, 1]: a sigmoid of random gain and centre, or a piecewise-linear
    curve through random increasing knots (what display LUTs and vendor exports do)."""
    x = np.clip(img, 0.0, 1.0)
    if rng.random() < 0.5:  # centred on the image's own mid-to-bright tissue, not on a fixed level
        gain, centre = rng.uniform(3.0, 7.0), float(np.percentile(x, rng.uniform(60.0, 90.0)))
        low, high = 1 / (1 + math.exp(gain * centre)), 1 / (1 + math.exp(-gain * (1 - centre)))
        y = (1.0 / (1.0 + np.exp(-gain * (x - centre))) - low) / (high - low)
        return y.astype(np.float32)
    xs = np.concatenate([[0.0], np.linspace(0.2, 0.8, 4), [1.0]])
    knots = np.sort(np.clip(xs[1:-1] + rng.uniform(-0.12, 0.12, 4), 0.0, 1.0))
    ys = np.concatenate([[0.0], knots, [1.0]])
    return np.interp(x, xs, ys).astype(np.float32)


# --- sequence -------------------------------------------------------------------------------------

def head_mask(img: np.ndarray, level: float = 0.06) -> np.ndarray:
    """Pixels brighter than ``level`` of the [0, 1] range, the head in an MR slice (air is dark on
    every sequence): a sequence remap changes tissue, never the background."""
    return cv2.medianBlur((img > level).astype(np.uint8), 5).astype(bool)


def random_tissue_curve(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth random curve on [0, 1], monotone or not, through 5-8 random knots: tissues swap
    their order of brightness as they do between T1, T2, FLAIR and post-contrast."""
    n = int(rng.integers(5, 9))
    xs = np.linspace(0.0, 1.0, n)
    ys = rng.uniform(0.05, 1.0, n)
    fine = np.linspace(0.0, 1.0, 256)
    curve = cv2.GaussianBlur(np.interp(fine, xs, ys).astype(np.float32)[None, :], (0, 0), 6.0)[0]
    return curve[np.clip((img * 255).astype(np.int32), 0, 255)]


def random_inversion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1 - x with a random gamma: fluid and oedema bright, white matter dark, as on T2."""
    return np.power(1.0 - np.clip(img, 0.0, 1.0), rng.uniform(0.6, 1.6)).astype(np.float32)


def random_intensity_network(img: np.ndarray, rng: np.random.Generator, layers: int = 3,
                             width: int = 4) -> np.ndarray:
    """A random shallow convolution network (3x3 kernels, leaky ReLU, fresh weights every call),
    rescaled to [0, 1]: the global intensity non-linear (GIN) augmentation of Ouyang et al. 2022,
    which changes contrast and texture locally while keeping the shapes."""
    planes = [img.astype(np.float32)]
    for layer in range(layers):
        out_width = 1 if layer == layers - 1 else width
        kernels = rng.normal(0.0, 1.0, (out_width, len(planes), 3, 3)).astype(np.float32)
        outs = []
        for o in range(out_width):
            acc = np.zeros_like(planes[0])
            for i, plane in enumerate(planes):
                acc += cv2.filter2D(plane, -1, kernels[o, i], borderType=cv2.BORDER_REFLECT)
            outs.append(acc if layer == layers - 1 else np.where(acc > 0, acc, 0.2 * acc))
        planes = outs
    out = planes[0]
    lo, hi = np.percentile(out, (1.0, 99.0))
    mixed = np.clip((out - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    alpha = rng.uniform(0.5, 1.0)  # blended with the original, as GIN does
    return (alpha * mixed + (1.0 - alpha) * img).astype(np.float32)


def random_sequence_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inside the head only: a random tissue curve, an inversion or a random network; air stays dark."""
    mask = head_mask(img)
    if mask.mean() < 0.02:  # no head to remap
        return img
    kind = rng.integers(3)
    remapped = (random_tissue_curve(img, rng) if kind == 0 else
                random_inversion(img, rng) if kind == 1 else random_intensity_network(img, rng))
    floor = 0.08  # the head stays brighter than the air around it
    return np.where(mask, floor + (1.0 - floor) * remapped, img * 0.5).astype(np.float32)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def unsharp_mask(img: np.ndarray, amount: float, sigma: float = 1.0) -> np.ndarray:
    """Sharpen: add back ``amount`` times the detail a blur removes (scanner "edge enhancement")."""
    return (img + amount * (img - gaussian_blur(img, sigma))).astype(np.float32)


def jpeg_recompress(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through 8-bit JPEG at ``quality``: the blocking and ringing of exported slices."""
    u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any 2-D uint8 array
        return img
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0


class Augment:
    """The training augmentation pipeline: gray slice (any range) -> augmented gray in [0, 1]-ish.
    Order follows how an image is made: geometry of the acquisition, the scanner's field and noise,
    then display / export (contrast, pixel size, sharpness, compression)."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        img = scale_intensity(gray)
        if rng.random() < c.aspect_probability:
            img = random_aspect(img, rng, c.aspect_range)
        img = random_crop_or_border(img, rng, c.crop_border)
        img = random_rotation_and_scaling(img, rng, c.rotation_degrees, c.scale_range)
        img = random_flips(img, rng, c.horizontal_flip, c.vertical_flip)
        if rng.random() < c.bias_field_probability:
            img = scale_intensity(random_bias_field(img, rng, c.bias_field_strength))
        img = robust_unit(random_noise(img, rng, c.noise_std))
        if rng.random() < c.sequence_probability:
            img = random_sequence_contrast(img, rng)
        img = random_gamma(img, rng, c.gamma_range)
        if rng.random() < c.curve_probability:
            img = random_contrast_curve(img, rng)
        img = random_window(img, rng, c.window_clip)
        if rng.random() < c.resample_probability:
            img = random_pixel_size(img, rng, c.long_side_range)
        if rng.random() < c.blur_probability:
            img = gaussian_blur(img, rng.uniform(*c.blur_sigma_range))
        elif rng.random() < c.sharpen_probability:
            img = np.clip(unsharp_mask(img, rng.uniform(*c.sharpen_amount_range)), 0.0, 1.0)
        if rng.random() < c.jpeg_probability:
            img = jpeg_recompress(img, int(rng.integers(c.jpeg_quality_range[0], c.jpeg_quality_range[1] + 1)))
        return img.astype(np.float32, copy=False)
