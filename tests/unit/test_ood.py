"""The out-of-distribution score: Mahalanobis distance to the nearest class in whitened feature space."""

import numpy as np
import pytest

from model_export import ood


def _clusters(rng: np.random.Generator, n: int = 400, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Three classes: Gaussian clusters with a shared, strongly anisotropic covariance."""
    scales = np.geomspace(5.0, 0.05, dim)
    centres = np.random.default_rng(99).normal(0, 3.0, (3, dim))  # the same classes for every sample
    y = rng.integers(0, 3, n)
    return centres[y] + rng.normal(0, 1, (n, dim)) * scales, y


def test_in_distribution_points_score_low_and_far_points_high():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng)
    fit = ood.calibrate(ood.fit(x, y, components=32), _clusters(np.random.default_rng(1))[0], quantile=0.99)
    held_out = _clusters(np.random.default_rng(2))[0]
    assert ood.flagged(fit, held_out).mean() < 0.05
    # Far along a low-variance direction: small in Euclidean terms, far in Mahalanobis terms.
    odd = held_out.copy()
    odd[:, -1] += 1.0  # 20 standard deviations of that direction
    assert ood.flagged(fit, odd).mean() > 0.95


def test_score_is_squared_distance_to_the_nearest_class_in_whitened_space():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]] * 10) + np.random.default_rng(0).normal(0, 0.1, (40, 2))
    y = np.array([0, 0, 1, 1] * 10)
    fit = ood.fit(x, y, components=2)
    z = (x[:3].astype(np.float32) - fit.mean) @ fit.projection
    expected = ((z[:, None] - fit.class_means[None]) ** 2).sum(-1).min(-1)
    np.testing.assert_allclose(ood.score(fit, x[:3]), expected, rtol=1e-5)


def test_calibration_flags_the_chosen_share_of_validation():
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, n=2000)
    fit = ood.calibrate(ood.fit(x, y), x, quantile=0.95)
    assert fit.calibration["val_flagged"] == pytest.approx(0.05, abs=0.005)
    assert fit.calibration["components"] == 32  # capped at the feature dimension


def test_state_round_trips():
    x, y = _clusters(np.random.default_rng(4))
    fit = ood.calibrate(ood.fit(x, y, components=4), x)
    back = ood.OodFit.from_state(fit.to_state())
    np.testing.assert_array_equal(back.projection, fit.projection)
    assert back.threshold == fit.threshold and back.calibration == fit.calibration
