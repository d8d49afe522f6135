import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from model_export.baselines import TextureSVM, texture_features


def _disc(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.uniform(30, 66), rng.uniform(30, 66), rng.uniform(10, 25)
    img = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32) * 200
    return img + rng.normal(0, 10, img.shape).astype(np.float32)


def _stripes(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
    img = 100 + 80 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period)
    return img.astype(np.float32) + rng.normal(0, 10, img.shape).astype(np.float32)


def _dataset(seed: int, per_class: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    grays = [_disc(rng) for _ in range(per_class)] + [_stripes(rng) for _ in range(per_class)]
    return grays, ["disc"] * per_class + ["stripes"] * per_class


def test_texture_features_ignore_intensity_scale_and_size():
    rng = np.random.default_rng(1)
    img = _stripes(rng)
    a = texture_features(img)
    assert a.ndim == 1 and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.allclose(a, texture_features(img * 16.0 + 500.0), atol=1e-3)  # 12-bit-like range, same view
    assert texture_features(np.zeros((300, 200), np.float32)).shape == a.shape  # any input size


def test_texture_svm_separates_unseen_synthetic_classes():
    grays, labels = _dataset(seed=2, per_class=25)
    svm = TextureSVM().fit(grays, labels)
    assert svm.labels == ("disc", "stripes")
    test_grays, test_labels = _dataset(seed=3, per_class=15)
    predicted = svm.predict(test_grays)
    assert np.mean([p == t for p, t in zip(predicted, test_labels)]) >= 0.9


def test_texture_svm_save_load_keeps_predictions(tmp_path):
    grays, labels = _dataset(seed=4, per_class=10)
    svm = TextureSVM().fit(grays, labels)
    svm.save(tmp_path / "svm.pkl")
    loaded = TextureSVM.load(tmp_path / "svm.pkl")
    assert loaded.labels == svm.labels
    assert loaded.predict(grays) == svm.predict(grays)
