"""A set of images that are not brain MR slices, assembled from what installed packages ship, for
measuring the out-of-distribution guard (issue: >= 95% of these flagged).

Sources, each image named ``<source>/<name>``:
- ``dicom``: every pydicom / pydicom-data test file the service's decoder can read (CT, CR, US, NM,
  other-modality MR such as abdomen, secondary captures, test patterns, segmentations, and the small
  64x64 MR crops such as ``MR_small.dcm``), duplicates of the same pixels removed;
- ``skimage``: scikit-image's bundled sample images (photos, microscopy, astronomy, text, textures,
  the Shepp-Logan head phantom);
- ``synthetic``: blank, constant, noise, gradients, stripes, checkerboards, discs, random shapes,
  text; seeded, so the set is the same everywhere;
- ``patch``: tiny patches (16-96 pixels) cut from the images above.

Everything goes through the service's own decoder (PNG bytes for non-DICOM images), so the guard
is measured on exactly what the service would see. Needs the ``dev`` extra (pydicom-data,
scikit-image); a source whose package is missing is skipped with a log line.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from app.core.decode import DICOM, PNG, decode
from app.core.errors import ServiceError

log = logging.getLogger(__name__)

# Scikit-image sample images that are not a brain slice (``brain`` would be one, and needs a download).
SKIMAGE_NAMES = (
    "astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock",
    "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
    "logo", "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text",
)


@dataclass(frozen=True)
class NonBrainImage:
    name: str  # "<source>/<name>"
    data: bytes  # encoded file (DICOM or PNG)
    media_type: str

    @property
    def source(self) -> str:
        return self.name.split("/", 1)[0]


def _png(gray_or_colour: np.ndarray) -> bytes:
    img = np.asarray(gray_or_colour)
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = np.zeros(img.shape, np.uint8) if hi <= lo else np.rint((img - lo) / (hi - lo) * 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] >= 3:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def dicom_images() -> Iterator[NonBrainImage]:
    try:
        from pydicom.data import get_testdata_files
    except ImportError:  # pragma: no cover - pydicom is a service dependency
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom-data's download attempts; we use what is on disk
        paths = sorted(set(get_testdata_files("*.dcm")))
    for path in paths:
        yield NonBrainImage(f"dicom/{Path(path).name}", Path(path).read_bytes(), DICOM)


def skimage_images() -> Iterator[NonBrainImage]:
    try:
        import skimage.data
    except ImportError:
        log.info("scikit-image is not installed: no sample photos in the non-brain set")
        return
    for name in SKIMAGE_NAMES:
        try:
            img = getattr(skimage.data, name)()
        except Exception as exc:  # a sample that needs a download (no network here)
            log.info("skimage.data.%s unavailable (%s)", name, type(exc).__name__)
            continue
        yield NonBrainImage(f"skimage/{name}", _png(img), PNG)


def synthetic_images(seed: int = 0) -> Iterator[NonBrainImage]:
    rng = np.random.default_rng(seed)
    size = 256
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yield NonBrainImage("synthetic/blank", _png(np.zeros((size, size), np.uint8)), PNG)
    yield NonBrainImage("synthetic/white", _png(np.full((size, size), 255, np.uint8)), PNG)
    yield NonBrainImage("synthetic/grey", _png(np.full((size, size), 128, np.uint8)), PNG)
    for i in range(4):
        yield NonBrainImage(f"synthetic/uniform-noise-{i}", _png(rng.integers(0, 256, (size, size), dtype=np.uint8)), PNG)
        yield NonBrainImage(f"synthetic/gaussian-noise-{i}", _png(rng.normal(0.0, 1.0, (size, size))), PNG)
        smooth = cv2.GaussianBlur(rng.normal(0.0, 1.0, (size, size)).astype(np.float32), (0, 0), 8.0 * (i + 1))
        yield NonBrainImage(f"synthetic/smooth-noise-{i}", _png(smooth), PNG)
    for i, angle in enumerate((0.0, 0.6, 1.3, 2.2)):
        yield NonBrainImage(f"synthetic/gradient-{i}", _png(np.cos(angle) * xx + np.sin(angle) * yy), PNG)
        period = 6 + 10 * i
        yield NonBrainImage(f"synthetic/stripes-{i}", _png(np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle))
                                                                   * size / period)), PNG)
        cells = 4 + 6 * i
        board = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
        yield NonBrainImage(f"synthetic/checkerboard-{i}", _png(board), PNG)
    for i in range(6):  # uniform discs and ellipses: a head's outline with nothing inside
        ry, rx = rng.uniform(0.2, 0.45, 2)
        cy, cx = rng.uniform(0.4, 0.6, 2)
        disc = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0).astype(np.float32) * rng.uniform(0.3, 1.0)
        yield NonBrainImage(f"synthetic/disc-{i}", _png(disc + 0.02 * rng.random((size, size))), PNG)
    for i in range(6):  # random rectangles and circles
        canvas = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(3, 12))):
            colour = int(rng.integers(40, 256))
            if rng.random() < 0.5:
                x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
                x1, y1 = x0 + int(rng.integers(10, 120)), y0 + int(rng.integers(10, 120))
                cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, -1)
            else:
                centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
                cv2.circle(canvas, centre, int(rng.integers(5, 70)), colour, -1)
        yield NonBrainImage(f"synthetic/shapes-{i}", _png(canvas), PNG)
    for i, words in enumerate(("PATIENT REPORT", "NO IMAGE", "MRI BRAIN AXIAL T1", "Lorem ipsum dolor")):
        canvas = np.zeros((size, size), np.uint8)
        cv2.putText(canvas, words, (8, 60 + 40 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 255, 2)
        yield NonBrainImage(f"synthetic/text-{i}", _png(canvas), PNG)


def tiny_patches(images: list[NonBrainImage], seed: int = 0, count: int = 24) -> Iterator[NonBrainImage]:
    """Patches of 16..96 pixels cut from decodable images of the set (no whole slice fits in them)."""
    rng = np.random.default_rng(seed)
    sources = [i for i in images if i.media_type == PNG]
    for n in range(min(count, len(sources))):
        image = sources[int(rng.integers(len(sources)))]
        pixels = decode(image.data, image.media_type).pixels
        side = int(rng.integers(16, 97))
        if min(pixels.shape) <= side:
            continue
        y, x = (int(rng.integers(0, d - side)) for d in pixels.shape)
        yield NonBrainImage(f"patch/{n}-{image.name.split('/', 1)[1]}-{side}", _png(pixels[y:y + side, x:x + side]), PNG)


def non_brain_set(seed: int = 0) -> list[NonBrainImage]:
    """The whole set, decodable by the service, each distinct decoded image once."""
    candidates = [*dicom_images(), *skimage_images(), *synthetic_images(seed)]
    candidates += list(tiny_patches(candidates, seed))
    chosen, seen = [], set()
    for image in candidates:
        try:
            pixels = decode(image.data, image.media_type).pixels
        except ServiceError:  # not an image the service takes (RT plans, SR, truncated files ...)
            continue
        digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes() + str(pixels.shape).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        chosen.append(image)
    return chosen


def main() -> int:  # pragma: no cover - a listing for people
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    images = non_brain_set()
    from collections import Counter

    print(dict(Counter(i.source for i in images)), len(images))
    for image in images:
        print(image.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
