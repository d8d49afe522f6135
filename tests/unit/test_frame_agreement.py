"""The faster ``frame`` against the implementation the shipped model was trained with
(``tests/frame_reference.py``): on real data through the model, ``bench/frame_agreement.py``."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.contract import PreprocessSpec, _percentile, preprocess
from tests import frame_reference
from tests.unit.test_contract import _head


@pytest.mark.parametrize("shape", [(300, 260), (512, 512), (256, 400), (1024, 900)])
def test_frame_agrees_with_the_reference_on_synthetic_slices(shape):
    spec = PreprocessSpec()
    for seed in range(3):
        gray = _head(shape, seed)
        new, old = preprocess(gray, spec), frame_reference.preprocess(gray, spec)
        # The same arithmetic in another order: float rounding only.
        np.testing.assert_allclose(new, old, atol=1e-3, err_msg=str((shape, seed)))


def test_version_1_and_whole_image_specs_are_unchanged():
    gray = _head((300, 260))
    for spec in (PreprocessSpec.legacy(), PreprocessSpec(crop="none")):
        np.testing.assert_allclose(preprocess(gray, spec), frame_reference.preprocess(gray, spec), atol=1e-4)


def test_blank_and_flat_slices_match_the_reference():
    for gray in (np.zeros((64, 64), np.float32), np.full((200, 300), 7.0, np.float32)):
        np.testing.assert_array_equal(preprocess(gray, PreprocessSpec()),
                                      frame_reference.preprocess(gray, PreprocessSpec()))


def test_percentile_is_numpys():
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 50_176):
        values = rng.random(size).astype(np.float32)
        for q in (0.0, 0.5, 50.0, 99.5, 100.0):
            assert _percentile(values, q) == float(np.percentile(values, q))
