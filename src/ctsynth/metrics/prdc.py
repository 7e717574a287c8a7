"""k-NN manifold precision and recall (Kynkäänniemi et al. 2019), plus density and coverage
(Naeem et al. 2020), which are less sensitive to real outliers.

Each sample's neighbourhood is a ball whose radius is the distance to its k-th nearest neighbour
in its own set; the union of the balls approximates that set's manifold.
- precision: fraction of synthetic samples inside the real manifold (are they realistic?)
- recall:    fraction of real samples inside the synthetic manifold (is the variety covered?)
- density:   how many real balls each synthetic sample falls in, / k (1 on average for a match)
- coverage:  fraction of real balls that contain at least one synthetic sample
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each sample to its k-th nearest other sample in the same set."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples; got {len(features)}")
    distances = cdist(features, features)
    # Column 0 of each sorted row is the sample itself (distance 0), so index k is the k-th other.
    return np.sort(distances, axis=1)[:, k]


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two 2-D arrays with the same feature size; got {real.shape} and {fake.shape}")
    real_radii = kth_neighbour_radii(real, k)
    fake_radii = kth_neighbour_radii(fake, k)
    real_to_fake = cdist(real, fake)  # rows: real, columns: fake

    inside_real_balls = real_to_fake <= real_radii[:, None]  # [i, j]: fake j inside real ball i
    precision = inside_real_balls.any(axis=0).mean()
    recall = (real_to_fake <= fake_radii[None, :]).any(axis=1).mean()
    density = inside_real_balls.sum(axis=0).mean() / k
    coverage = (real_to_fake.min(axis=1) <= real_radii).mean()
    return {
        "precision": float(precision),
        "recall": float(recall),
        "density": float(density),
        "coverage": float(coverage),
    }
