"""The contract's ``frame`` as it was up to b19439c (the implementation the shipped 1.2.0 model was
trained and evaluated with), kept only as the reference that the faster ``app.core.contract.frame``
is measured against: ``tests/unit/test_frame_agreement.py`` on synthetic slices, and
``bench/frame_agreement.py`` on real data through the shipped model. Do not use it elsewhere.
"""

from __future__ import annotations

import cv2
import numpy as np

from app.core.contract import _INTERPOLATIONS, MASK_SIDE, MIN_HEAD_SHARE, Framing, PreprocessSpec, normalise

MAJOR_REGION_SHARE = 0.2


def scale_intensity(gray: np.ndarray) -> np.ndarray:
    """Scale a 2-D image to [0, 1] in float32 by its own min and max (a flat image gives 0)."""
    g = np.asarray(gray, dtype=np.float32)
    lo = float(g.min())
    hi = float(g.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(g, dtype=np.float32)
    return (g - lo) * np.float32(1.0 / (hi - lo))


def _fill_holes(region: np.ndarray) -> np.ndarray:
    """Flood the background from outside; what the flood does not reach belongs to the region."""
    flood = np.pad(region, 1)
    cv2.floodFill(flood, None, (0, 0), 1)
    return (region | (flood[1:-1, 1:-1] == 0)).astype(np.uint8)


def _major_regions(binary: np.ndarray, share: float) -> np.ndarray | None:
    """The connected regions at least ``share`` of the largest one's area (None when there is none)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(count, dtype=np.uint8)
    keep[1:] = areas >= share * areas.max()
    return keep[labels]


_OPEN_THIN = np.ones((3, 3), np.uint8)
_CLOSE_RING = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
_OPEN_SOLID = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))


def head_region(unit: np.ndarray) -> tuple[np.ndarray, float]:
    """(boolean mask of the head, the foreground level in [0, 1] units) of a [0, 1] image; meant
    for a small copy (``MASK_SIDE``).

    Smooth (noise), threshold at half Otsu's level but never above a fifth of the 99th percentile
    (a bright lesion must not lift the threshold above the brain), open 3x3 (specks, text), close
    9x9 (a skull ring broken by dark fat or bone), fill holes, open 7x7 so that thin lines touching
    the head (frames, rulers) are cut off, and keep every region of at least a fifth of the largest
    one's area (the pieces of a head whose brain is dark, not a label in a corner)."""
    smooth = cv2.GaussianBlur(unit, (0, 0), 1.5)
    u8 = np.clip(smooth * 255.0 + 0.5, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    p99 = int(np.searchsorted(np.cumsum(np.bincount(u8.reshape(-1), minlength=256)), 0.99 * u8.size))
    level = max(1.0, min(0.5 * otsu, 0.2 * p99))
    fg = cv2.morphologyEx((u8 > level).astype(np.uint8), cv2.MORPH_OPEN, _OPEN_THIN)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, _CLOSE_RING)
    solid = _fill_holes(fg)
    trimmed = cv2.morphologyEx(solid, cv2.MORPH_OPEN, _OPEN_SOLID)
    regions = _major_regions(trimmed, MAJOR_REGION_SHARE)
    if regions is None:
        regions = _major_regions(solid, MAJOR_REGION_SHARE)
    mask = np.zeros(unit.shape, dtype=bool) if regions is None else regions.astype(bool)
    return mask, level / 255.0


def _moments_square(mask: np.ndarray, scale: float, origin: tuple[float, float],
                    margin: float) -> tuple[float, float, float]:
    """(x, y, side) in image pixels of the square around a mask drawn on a grid of ``scale`` image
    pixels per cell starting at ``origin``: centre = centroid, half side = 2 standard deviations along
    the longer axis (exactly the bounding box of an ellipse), plus ``margin`` of the side each way.
    Moments average over the whole region, so they barely move with pixel size, noise or a stray
    protrusion, where the extreme pixels of a bounding box would."""
    ys, xs = np.nonzero(mask)
    px, py = origin[0] + (xs + 0.5) * scale, origin[1] + (ys + 0.5) * scale
    half = 2.0 * max(float(px.std()), float(py.std()), 0.5 * scale)
    side = 2.0 * half * (1.0 + 2.0 * margin)
    return float(px.mean()) - side / 2.0, float(py.mean()) - side / 2.0, side


def _head_box(unit: np.ndarray, spec: PreprocessSpec) -> tuple[tuple[float, float, float], float | None]:
    """((x, y, side) of the square crop in image pixels, the head's foreground level, or None when no
    head was found and the square is the whole image).

    Two passes: a coarse square from the whole image at ``MASK_SIDE``, then the head found again on
    that square (widened) resampled to ``MASK_SIDE``, so the final square and level are measured
    at the head's own scale and do not depend on the canvas around it."""
    h, w = unit.shape
    whole = (min(0.0, (w - h) / 2.0), min(0.0, (h - w) / 2.0), float(max(w, h)))
    square = _crop_square(unit, whole, MASK_SIDE, cv2.INTER_AREA)
    mask, level = head_region(square)
    if mask.mean() < MIN_HEAD_SHARE:
        return whole, None
    coarse = _moments_square(mask, whole[2] / MASK_SIDE, whole[:2], 0.15)
    square = _crop_square(unit, coarse, MASK_SIDE, cv2.INTER_AREA)
    mask, level = head_region(square)
    if mask.mean() < MIN_HEAD_SHARE:  # pragma: no cover - the coarse pass found a head in this square
        return coarse, None
    return _moments_square(mask, coarse[2] / MASK_SIDE, coarse[:2], spec.head_margin), level


def _percentile_window(square: np.ndarray, level: float | None, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) of the intensity window, taken on the model-size square, so the same pixels count
    whatever the canvas, border or pixel size of the input: lo is the low percentile of the whole
    square (the background, or the darkest tissue of a head that fills it), hi the high percentile
    of the head (pixels above its foreground level), so a dark background does not dilute it."""
    lo = float(np.percentile(square, percentiles[0]))
    head = square[square > level] if level is not None else square
    if head.size < 0.01 * square.size:
        head = square
    return lo, float(np.percentile(head, percentiles[1]))


def _crop_square(img: np.ndarray, box: tuple[float, float, float], size: int, interpolation: int) -> np.ndarray:
    """The square ``box`` of ``img`` (zero outside the image) resized to ``size``: one affine warp,
    so crop, pad and resize cost one pass. Area interpolation is done as a resize of the cropped,
    padded array (warpAffine has no area mode)."""
    x, y, side = box
    h, w = img.shape
    if interpolation == cv2.INTER_AREA and side > size:
        xi, yi, si = int(np.floor(x)), int(np.floor(y)), int(np.ceil(side))
        crop = img[max(yi, 0) : min(yi + si, h), max(xi, 0) : min(xi + si, w)]
        top, left = max(-yi, 0), max(-xi, 0)
        bottom, right = max(si - top - crop.shape[0], 0), max(si - left - crop.shape[1], 0)
        square = cv2.copyMakeBorder(crop, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0.0)
        return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
    scale = size / side
    matrix = np.array([[scale, 0.0, -x * scale], [0.0, scale, -y * scale]], dtype=np.float64)
    flags = cv2.INTER_LINEAR if interpolation == cv2.INTER_AREA else interpolation
    return cv2.warpAffine(img, matrix, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def frame(gray: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Framing]:
    """Decoded 2-D slice -> (the ``[size, size]`` float32 intensity image before normalisation,
    where it lies in the slice)."""
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    unit = scale_intensity(gray)
    interpolation = _INTERPOLATIONS[spec.interpolation]
    h, w = unit.shape
    level: float | None = None
    if spec.version == 1 or (spec.crop == "none" and spec.aspect == "squash"):
        square = cv2.resize(unit, (spec.size, spec.size), interpolation=interpolation)
        framing = Framing(0.0, 0.0, float(w), height=float(h))
        if spec.intensity == "head-percentiles":
            level = head_region(cv2.resize(square, (MASK_SIDE, MASK_SIDE), interpolation=cv2.INTER_AREA))[1]
    else:
        if spec.crop == "head":
            box, level = _head_box(unit, spec)
        else:  # the whole image, padded to a square
            side = float(max(w, h)) * (1.0 + 2.0 * spec.head_margin)
            box = ((w - side) / 2.0, (h - side) / 2.0, side)
        square = _crop_square(unit, box, spec.size, interpolation)
        framing = Framing(*box, head_found=level is not None if spec.crop == "head" else None)
    if spec.intensity == "head-percentiles":
        lo, hi = _percentile_window(square, level, spec.percentiles)
        span = hi - lo if hi > lo else 1.0
        square = np.clip((square - lo) * np.float32(1.0 / span), 0.0, 1.0)
    return square.astype(np.float32, copy=False), framing


def preprocess(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return normalise(frame(gray, spec)[0], spec)
