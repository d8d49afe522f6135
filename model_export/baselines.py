"""A classical baseline of the kind the service replaces: HOG + LBP texture features and an SVM.

Used by ``bench/compare.py`` to put the ResNet-50 beside what a pre-deep-learning system would
score on the same images. Inputs are decoded 2-D gray slices (any range); they are scaled with the
contract's ``scale_intensity`` so the baseline sees the same intensity normalisation as the model.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from app.core.contract import scale_intensity

FEATURE_SIZE = 128  # side of the square the slice is resized to before feature extraction
LBP_GRID = 4  # LBP histograms over a LBP_GRID x LBP_GRID grid of cells (coarse spatial layout)
LBP_POINTS, LBP_RADIUS = 8, 1
LBP_BINS = LBP_POINTS * (LBP_POINTS - 1) + 3  # "nri_uniform" codes: 59 for 8 neighbours
INTENSITY_BINS = 32


def texture_features(gray: np.ndarray, size: int = FEATURE_SIZE) -> np.ndarray:
    """One float32 vector: HOG (shape), a grid of LBP histograms (texture), an intensity histogram."""
    from skimage.feature import hog, local_binary_pattern

    unit = cv2.resize(scale_intensity(gray), (size, size), interpolation=cv2.INTER_AREA)
    shape = hog(unit, orientations=9, pixels_per_cell=(16, 16), cells_per_block=(2, 2), feature_vector=True)
    codes = local_binary_pattern((unit * 255).astype(np.uint8), LBP_POINTS, LBP_RADIUS, method="nri_uniform")
    cell = size // LBP_GRID
    texture = [
        np.bincount(codes[r : r + cell, c : c + cell].astype(np.int64).ravel(), minlength=LBP_BINS) / cell**2
        for r in range(0, cell * LBP_GRID, cell)
        for c in range(0, cell * LBP_GRID, cell)
    ]
    intensity = np.histogram(unit, bins=INTENSITY_BINS, range=(0.0, 1.0))[0] / unit.size
    return np.concatenate([shape, *texture, intensity]).astype(np.float32)


class TextureSVM:
    """Standardised texture features -> RBF SVM (one-vs-rest scores, labels from the data)."""

    def __init__(self, c: float = 10.0) -> None:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.model = make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", gamma="scale"))
        self.labels: tuple[str, ...] = ()

    def fit(self, grays: Iterable[np.ndarray], labels: Sequence[str]) -> TextureSVM:
        features = np.stack([texture_features(g) for g in grays])
        self.labels = tuple(sorted(set(labels)))
        self.model.fit(features, np.asarray([self.labels.index(x) for x in labels]))
        return self

    def predict_features(self, features: np.ndarray) -> list[str]:
        return [self.labels[int(i)] for i in self.model.predict(np.atleast_2d(features))]

    def predict(self, grays: Iterable[np.ndarray]) -> list[str]:
        return self.predict_features(np.stack([texture_features(g) for g in grays]))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(pickle.dumps({"labels": self.labels, "model": self.model}))

    @classmethod
    def load(cls, path: str | Path) -> TextureSVM:
        raw = pickle.loads(Path(path).read_bytes())  # our own file, written by save()
        svm = cls.__new__(cls)
        svm.model, svm.labels = raw["model"], tuple(raw["labels"])
        return svm
