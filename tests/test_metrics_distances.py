"""KID, Fréchet distance and k-NN precision/recall against hand computations and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from ctsynth.metrics import (
    frechet_distance,
    kernel_inception_distance,
    polynomial_kernel,
    precision_recall_density_coverage,
    unbiased_mmd2,
)
from ctsynth.metrics.frechet import frechet_distance_from_stats


def test_unbiased_mmd2_matches_hand_computation():
    # d = 1, so k(a, b) = (a*b + 1)^3.
    x = np.array([[0.0], [1.0]])
    y = np.array([[1.0], [2.0]])
    # within x, off-diagonal: k(0,1) = 1 (twice) / (2*1)      -> 1
    # within y, off-diagonal: k(1,2) = 27 (twice) / (2*1)     -> 27
    # across: k(0,1)=1, k(0,2)=1, k(1,1)=8, k(1,2)=27; mean   -> 9.25
    assert unbiased_mmd2(x, y) == pytest.approx(1.0 + 27.0 - 2 * 9.25)


def test_polynomial_kernel_uses_one_over_d():
    x = np.array([[1.0, 1.0]])
    y = np.array([[2.0, 0.0]])
    assert polynomial_kernel(x, y)[0, 0] == pytest.approx((2.0 / 2 + 1) ** 3)


def test_unbiased_mmd2_has_zero_mean_where_the_biased_estimator_does_not():
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(400):
        x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
        unbiased.append(unbiased_mmd2(x, y))
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    unbiased, biased = np.array(unbiased), np.array(biased)
    standard_error = unbiased.std() / np.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * standard_error
    assert biased.mean() > 10 * standard_error


def test_kid_near_zero_for_the_same_distribution_and_clearly_positive_for_a_shift():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(150, 16))
    same = rng.normal(size=(150, 16))
    shifted = rng.normal(size=(150, 16)) + 1.0
    same_mean, same_std = kernel_inception_distance(real, same, num_subsets=20, subset_size=100)
    shift_mean, shift_std = kernel_inception_distance(real, shifted, num_subsets=20, subset_size=100)
    assert abs(same_mean) < 3 * same_std + 0.01
    assert shift_mean > 0.5
    assert shift_mean > 20 * max(abs(same_mean), same_std)
    identical_mean, identical_std = kernel_inception_distance(real, real, num_subsets=20, subset_size=1000)
    assert abs(identical_mean) < 0.05 * shift_mean
    # Subsets are capped at half the set so that they differ and the std measures sampling noise.
    assert identical_std > 0


def test_kid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same feature size"):
        unbiased_mmd2(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # Per dimension: (m1 - m2)^2 + (s1 - s2)^2 with s = sqrt(var).
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert expected == pytest.approx(1 + 0 + 4 + 1 + 1 + 0)
    got = frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_of_samples_approaches_the_1d_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(200_000, 1))
    b = rng.normal(3.0, 2.0, size=(200_000, 1))
    assert frechet_distance(a, b) == pytest.approx(3.0**2 + (2.0 - 1.0) ** 2, rel=0.01)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_stays_finite_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(3)
    value = frechet_distance(rng.normal(size=(10, 40)), rng.normal(size=(10, 40)))
    assert np.isfinite(value) and value > 0


def test_precision_recall_are_one_for_identical_sets_and_zero_for_disjoint_ones():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(100, 8))
    identical = precision_recall_density_coverage(real, real.copy(), k=3)
    assert identical["precision"] == 1.0 and identical["recall"] == 1.0 and identical["coverage"] == 1.0
    disjoint = precision_recall_density_coverage(real, real + 100.0, k=3)
    assert disjoint == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_precision_drops_when_fakes_leave_the_manifold_and_recall_when_they_collapse():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(150, 4))
    half_off = np.vstack([rng.normal(size=(75, 4)), rng.normal(size=(75, 4)) + 50.0])
    scores = precision_recall_density_coverage(real, half_off, k=3)
    assert 0.3 < scores["precision"] < 0.6  # the 75 far-away fakes are outside every real ball
    collapsed = rng.normal(scale=0.05, size=(150, 4))  # mode collapse onto the centre
    scores = precision_recall_density_coverage(real, collapsed, k=3)
    assert scores["precision"] > 0.9
    assert scores["recall"] < 0.2


def test_frechet_distance_low_rank_route_matches_the_sqrtm_route():
    # n < d takes the nuclear-norm route; it must equal the d x d sqrtm formula.
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(12, 20)), rng.normal(0.3, 1.5, size=(9, 20))
    mu1, mu2 = a.mean(0), b.mean(0)
    sigma1, sigma2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps=0.0)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)
