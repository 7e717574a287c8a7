"""Fréchet distance between Gaussians fitted to two feature sets (the formula behind FID).

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

Biased upwards at small n (the covariance estimates are noisy, and noise only adds distance), so
it is only meaningful next to a real-vs-real value computed with the same n and feature size.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need a 2-D array with at least 2 rows to fit a Gaussian; got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _sqrtm_quiet(matrix: np.ndarray) -> np.ndarray:
    # scipy warns on singular input; _is_square_root below is the check we act on.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


def _is_square_root(root: np.ndarray, matrix: np.ndarray, rtol: float = 1e-3) -> bool:
    if not np.isfinite(root).all():
        return False
    residual = np.linalg.norm(root @ root - matrix)
    return bool(residual <= rtol * max(np.linalg.norm(matrix), 1e-12))


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mean/covariance shapes differ: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    product = sigma1 @ sigma2
    covmean = _sqrtm_quiet(product)
    if not _is_square_root(covmean, product):
        # A singular product (fewer samples than dimensions, or a constant feature) has no
        # accurate square root; a small ridge on both covariances makes it well defined.
        log.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm_quiet((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; a large one means the result is not trustworthy.
        max_imag = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component of {max_imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance(features1: np.ndarray, features2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance of the Gaussians fitted to two samples.

    With fewer samples than dimensions (150 images, 2048 Inception features) a d x d sqrtm is
    both slow (minutes on a shared CPU) and ill-conditioned. It is also unnecessary: with
    S_1 = A'A / (n_1 - 1) and S_2 = B'B / (n_2 - 1) for the centred samples A and B,
    Tr((S_1 S_2)^(1/2)) is the nuclear norm of A B' / sqrt((n_1 - 1)(n_2 - 1)), an n_1 x n_2
    matrix, exactly (S_1 S_2 and A B'B A' share their non-zero eigenvalues).
    """
    a = np.asarray(features1, dtype=np.float64)
    b = np.asarray(features2, dtype=np.float64)
    mu1, sigma1 = gaussian_stats(a)
    mu2, sigma2 = gaussian_stats(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) * len(b) >= a.shape[1] ** 2:
        return frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps)
    centred_a, centred_b = a - mu1, b - mu2
    cross = centred_a @ centred_b.T / np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_covmean = np.linalg.svd(cross, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)
