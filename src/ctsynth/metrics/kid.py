"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

Unlike FID, the estimator is unbiased, so its expected value does not depend on the number of
images; that is what makes it usable with ~150 images per class. The name keeps "Inception" for
recognition, but the features can come from any embedding (see `ctsynth.metrics.features`).
"""

from __future__ import annotations

import numpy as np


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma * x.y + coef0) ** degree, gamma = 1/d by default (the KID kernel)."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (gamma * (x @ y.T) + coef0) ** degree


def unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD^2 between samples x (m x d) and y (n x d).

    The within-set sums leave out the diagonal k(x_i, x_i): including it is what biases the
    plain (V-statistic) estimator upwards at small n.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"MMD needs two 2-D arrays with the same feature size; got {x.shape} and {y.shape}")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set; got {m} and {n}")
    k_xx = polynomial_kernel(x, x, degree)
    k_yy = polynomial_kernel(y, y, degree)
    k_xy = polynomial_kernel(x, y, degree)
    sum_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    sum_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
) -> tuple[float, float]:
    """KID as (mean, std) of unbiased MMD^2 over random subsets of both sets.

    Each subset draws `subset_size` images from each set without replacement. At small n the
    size is capped at half the smaller set: subsets as large as the set would all be the same
    images, and the std over subsets (the spread that says how much of the number is sampling
    noise) would be 0. The mean stays unbiased at any subset size.
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    smaller = min(len(real), len(fake))
    if smaller < 2 or subset_size < 2:
        raise ValueError(f"KID needs at least 2 images per set; got {len(real)} real and {len(fake)} synthetic")
    size = min(subset_size, max(2, smaller // 2))
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        real_subset = real[rng.choice(len(real), size, replace=False)]
        fake_subset = fake[rng.choice(len(fake), size, replace=False)]
        values[i] = unbiased_mmd2(real_subset, fake_subset, degree)
    return float(values.mean()), float(values.std())
