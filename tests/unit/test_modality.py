"""The CT-look rule (app.core.modality) on drawn heads: CT's bone ring around grey brain is
flagged; MR's bright scalp fat outside a dark skull, a uniform head and noise are not. Its measured
rates on real slices are in the README (scripts/measure_ct_rule.py)."""

import cv2
import numpy as np
import pytest

from app.core.modality import looks_like_ct
from app.engine.pipeline import not_mr_because


def drawn_head(layers: list[tuple[int, int]], size: int = 224, seed: int = 0) -> np.ndarray:
    """Concentric filled ellipses, outermost first: (inset in pixels, gray level), with mild noise."""
    img = np.zeros((size, size), np.float32)
    centre, axes = (size // 2, size // 2), (size // 2 - 20, size // 2 - 8)
    for inset, level in layers:
        cv2.ellipse(img, centre, (axes[0] - inset, axes[1] - inset), 0, 0, 360, float(level), -1)
    noise = np.random.default_rng(seed).normal(0.0, 4.0, img.shape).astype(np.float32)
    return np.clip(img + noise * (img > 0), 0, 255)


CT = [(0, 90), (3, 255), (12, 110)]  # thin scalp, thick bone (the brightest), grey brain right inside it
MR_T1 = [(0, 230), (5, 25), (10, 120)]  # bright scalp fat, dark skull, grey brain


def test_ct_look_is_flagged():
    assert looks_like_ct(drawn_head(CT))
    assert looks_like_ct(cv2.resize(drawn_head(CT), (1024, 1024)))  # at any size (run on a small copy)


@pytest.mark.parametrize("image", [drawn_head(MR_T1), drawn_head([(0, 190)]), np.zeros((64, 64), np.float32),
                                   np.random.default_rng(1).uniform(0, 255, (128, 128)).astype(np.float32)],
                         ids=["mr-t1", "uniform-head", "blank", "noise"])
def test_other_images_are_not_flagged(image):
    assert not looks_like_ct(image)


def test_dicom_modality_decides_and_the_pixel_rule_only_speaks_without_it():
    ct = drawn_head(CT)
    assert not_mr_because("MR", ct) is None  # a DICOM that says MR is believed
    assert not_mr_because("CT", drawn_head(MR_T1)) == "dicom"
    assert not_mr_because("", ct) == "ct-look" and not_mr_because(None, ct) == "ct-look"
    assert not_mr_because(None, drawn_head(MR_T1)) is None
