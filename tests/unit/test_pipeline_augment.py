"""Training augmentations on the float gray slice."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.contract import PreprocessSpec, preprocess
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


def test_aspect_stretches_one_axis_within_the_range(slice_: np.ndarray) -> None:
    for seed in range(10):
        out = augment.random_aspect(slice_, np.random.default_rng(seed), (0.8, 1.25))
        ratio = (out.shape[1] / out.shape[0]) / (slice_.shape[1] / slice_.shape[0])
        assert 0.78 <= ratio <= 1.27
        assert out.shape[0] == slice_.shape[0] or out.shape[1] == slice_.shape[1]


def test_pixel_size_puts_the_long_side_in_range(slice_: np.ndarray) -> None:
    sides = [max(augment.random_pixel_size(slice_, np.random.default_rng(s), (128, 512)).shape) for s in range(20)]
    assert min(sides) >= 127 and max(sides) <= 513 and max(sides) - min(sides) > 100


def test_bias_field_is_smooth_multiplicative_and_bounded() -> None:
    flat = np.full((96, 96), 0.5, dtype=np.float32)
    out = augment.random_bias_field(flat, np.random.default_rng(3), 0.3)
    ratio = out / flat
    assert ratio.min() >= np.exp(-0.3) * 0.97 and ratio.max() <= np.exp(0.3) * 1.03
    assert ratio.std() > 0.01  # not flat
    assert np.abs(np.diff(ratio, axis=1)).max() < 0.05  # smooth: no jumps between neighbours


def test_contrast_curves_are_monotone_and_keep_the_range() -> None:
    ramp = np.linspace(0, 1, 257, dtype=np.float32)[None, :]
    for seed in range(20):
        out = augment.random_contrast_curve(ramp, np.random.default_rng(seed))[0]
        assert np.all(np.diff(out) >= -1e-6)
        assert out[0] == pytest.approx(0.0, abs=1e-5) and out[-1] == pytest.approx(1.0, abs=1e-5)
        assert np.abs(out - ramp[0]).max() > 0.01  # it changed something


def test_blur_softens_and_sharpen_strengthens_edges(slice_: np.ndarray) -> None:
    unit = slice_ / slice_.max()

    def edges(img: np.ndarray) -> float:
        return float(np.abs(np.diff(img, axis=1)).mean())

    assert edges(augment.gaussian_blur(unit, 1.2)) < edges(unit) < edges(augment.unsharp_mask(unit, 1.0))


def test_jpeg_recompression_adds_loss_that_grows_as_quality_falls(slice_: np.ndarray) -> None:
    unit = (slice_ / slice_.max()).astype(np.float32)
    high, low = augment.jpeg_recompress(unit, 95), augment.jpeg_recompress(unit, 20)
    assert high.shape == low.shape == unit.shape and high.dtype == np.float32
    assert np.abs(high - unit).mean() < np.abs(low - unit).mean()


def test_robust_unit_ignores_a_hot_pixel(slice_: np.ndarray) -> None:
    hot = slice_.copy()
    hot[0, 0] = slice_.max() * 50
    assert augment.robust_unit(hot).mean() > 5 * (hot / hot.max()).mean()


def test_augmented_view_of_a_real_head_still_frames_the_head(slice_: np.ndarray) -> None:
    """Whatever the augmentation draws, the contract's head crop still finds a head (a box covering a
    large share of the augmented image), so the model never trains on a zoomed-in fragment."""
    from app.core.contract import PreprocessSpec, frame

    spec = PreprocessSpec()
    for seed in range(30):
        img = augment.Augment()(slice_, np.random.default_rng(seed))
        _, framing = frame(img, spec)
        assert framing.side >= 0.45 * max(img.shape), seed


def test_sequence_contrast_changes_the_head_and_keeps_the_air_dark():
    from model_export.augment import head_mask, random_sequence_contrast

    yy, xx = np.mgrid[:128, :128]
    head = ((yy - 64) ** 2 + (xx - 64) ** 2) < 45**2
    img = np.where(head, 0.3 + 0.5 * (xx / 128.0), 0.0).astype(np.float32)  # a head with a gradient
    rng = np.random.default_rng(0)
    outs = [random_sequence_contrast(img, rng) for _ in range(12)]
    mask = head_mask(img)
    for out in outs:
        assert out.shape == img.shape and out.dtype == np.float32
        assert out[~mask].max() <= 0.5 * img[~mask].max() + 1e-6  # air stays dark
        assert out[mask].min() >= 0.08 - 1e-6  # the head stays brighter than the air
    # the contrast inside the head really changes: some outputs reverse the left-right gradient
    slopes = [np.corrcoef(out[mask], xx[mask])[0, 1] for out in outs]
    assert min(slopes) < 0 < max(slopes)


def test_sequence_contrast_leaves_an_image_without_a_head_alone():
    from model_export.augment import random_sequence_contrast

    img = np.zeros((64, 64), np.float32)
    assert random_sequence_contrast(img, np.random.default_rng(0)) is img
