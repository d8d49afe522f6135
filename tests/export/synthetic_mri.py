"""Synthetic, learnable "MRI slices" written as an ImageFolder tree, for pipeline tests.

Each image is a dark background with a noisy bright ellipse (the head); the class decides
where a bright blob (the "tumour") sits, or that there is none, so a short training run can
learn something. Grayscale PNG, 3-channel PNG and JPEG files are mixed on purpose.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

LABELS = ("glioma", "meningioma", "notumor", "pituitary")
_BLOB_CENTRE = {"glioma": (0.45, 0.35), "meningioma": (0.2, 0.5), "pituitary": (0.7, 0.5)}


def synthetic_slice(label: str, rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """uint8 [size, size] slice for ``label``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)
    head = (((yy - cy) / 0.42) ** 2 + ((xx - cx) / 0.36) ** 2) < 1.0
    img = head * (0.35 + 0.1 * rng.random((size, size)))
    if label in _BLOB_CENTRE:
        by, bx = _BLOB_CENTRE[label]
        by, bx = by + rng.uniform(-0.05, 0.05), bx + rng.uniform(-0.05, 0.05)
        img = img + 0.6 * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * 0.06**2))
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, per_class: int = 6, size: int = 96, seed: int = 0,
                       labels: tuple[str, ...] = LABELS) -> list[Path]:
    """``root/<label>/<n>.{png,jpg}``; returns the written paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            img = synthetic_slice(label, rng, size)
            kind = n % 3
            if kind == 0:
                path = root / label / f"{n}.png"
                cv2.imwrite(str(path), img)
            elif kind == 1:
                path = root / label / f"{n}.png"
                cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))  # RGB file, gray content
            else:
                path = root / label / f"{n}.jpg"
                cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            paths.append(path)
    return paths


def write_split_file(root: Path, paths: list[Path], path: Path) -> Path:
    """A split file (path,label,split,group): per class, the first half train, then val, then test."""
    rows = []
    by_label: dict[str, list[Path]] = {}
    for p in paths:
        by_label.setdefault(p.parent.name, []).append(p)
    for label, items in by_label.items():
        for i, p in enumerate(items):
            split = "train" if i < len(items) // 2 else ("val" if i < 3 * len(items) // 4 else "test")
            rows.append({"path": str(p.relative_to(root)), "label": label, "split": split, "group": f"{label}{i}"})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return path
