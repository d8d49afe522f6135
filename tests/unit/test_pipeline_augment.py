"""Training augmentations on the float gray slice."""

from __future__ import annotations

import numpy as np
import pytest

from app.contract import PreprocessSpec, preprocess
from model_export import augment
from tests.export.synthetic_mri import synthetic_slice


@pytest.fixture
def slice_() -> np.ndarray:
    return synthetic_slice("glioma", np.random.default_rng(0), 96).astype(np.float32) * 4.0  # 0..1020 range


def test_augment_is_reproducible_for_a_seed_and_varies_across_seeds(slice_: np.ndarray) -> None:
    aug = augment.Augment()
    a = aug(slice_, np.random.default_rng([1, 2]))
    b = aug(slice_, np.random.default_rng([1, 2]))
    c = aug(slice_, np.random.default_rng([1, 3]))
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.allclose(a, c)


def test_augmented_slice_feeds_the_contract_preprocess(slice_: np.ndarray) -> None:
    out = augment.Augment()(slice_, np.random.default_rng(0))
    assert out.dtype == np.float32 and out.ndim == 2 and np.isfinite(out).all()
    assert preprocess(out, PreprocessSpec(size=32)).shape == (3, 32, 32)


def test_horizontal_flip_mirrors_the_slice(slice_: np.ndarray) -> None:
    flipped = augment.random_flips(slice_, np.random.default_rng(0), horizontal=1.0, vertical=0.0)
    np.testing.assert_array_equal(flipped, slice_[:, ::-1])


def test_resolution_change_keeps_the_size_but_loses_detail(slice_: np.ndarray) -> None:
    unit = slice_ / slice_.max()
    out = augment.random_resolution_change(unit, np.random.default_rng(0), (0.3, 0.3))
    assert out.shape == unit.shape
    assert np.abs(np.diff(out, axis=1)).mean() < np.abs(np.diff(unit, axis=1)).mean()


def test_crop_or_border_changes_the_field_of_view(slice_: np.ndarray) -> None:
    out = augment.random_crop_or_border(slice_, np.random.default_rng(5), 0.2)
    assert out.shape != slice_.shape or not np.array_equal(out, slice_)


def test_window_clips_both_ends_and_stretches_to_unit_range() -> None:
    ramp = np.linspace(0, 1, 101, dtype=np.float32)[None, :]
    out = augment.random_window(ramp, np.random.default_rng(0), 0.2)
    assert out.min() == 0.0 and out.max() == 1.0
    assert (out == 0.0).sum() > 1 or (out == 1.0).sum() > 1


def test_gamma_changes_mid_tones_and_keeps_the_ends() -> None:
    ramp = np.linspace(0, 1, 11, dtype=np.float32)[None, :]
    out = augment.random_gamma(ramp, np.random.default_rng(0), (2.0, 2.0))
    np.testing.assert_allclose(out, ramp**2.0, rtol=1e-5)


def test_rotation_and_scaling_keep_the_shape(slice_: np.ndarray) -> None:
    out = augment.random_rotation_and_scaling(slice_, np.random.default_rng(0), 30.0, (0.8, 0.8))
    assert out.shape == slice_.shape and out.sum() < slice_.sum()


def test_noise_is_zero_mean_and_at_most_the_maximum_std() -> None:
    flat = np.full((128, 128), 0.5, dtype=np.float32)
    stds = []
    for seed in range(20):
        noise = augment.random_noise(flat, np.random.default_rng(seed), 0.05) - flat
        assert abs(float(noise.mean())) < 0.01
        stds.append(float(noise.std()))
    assert max(stds) <= 0.05 * 1.1 and min(stds) < max(stds) and max(stds) > 0.01
