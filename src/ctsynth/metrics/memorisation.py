"""Memorisation: is a synthetic image closer to some training image than training images are to
each other?

For every synthetic image we take the distance to its nearest real TRAINING image and compare it
with the leave-one-out nearest-neighbour distances among the training images themselves. A
generator that samples new images from the training distribution lands below the p-th percentile
of train-to-train distances about p % of the time; a generator that copies lands far below, at 0
for an exact copy. Distances are root-mean-square pixel differences on the model-input scale
([-1, 1]), so 0.01 means about one grey level of 255 per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.distance import cdist


def rms_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise root-mean-square differences between rows of a (m x D) and b (n x D)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"images differ in size: {a.shape[1]} vs {b.shape[1]} pixels; read both at one resolution")
    return cdist(a, b) / np.sqrt(a.shape[1])


@dataclass(frozen=True)
class MemorisationResult:
    percentiles: dict[str, float]  # "p1" -> train-to-train NN distance at the 1st percentile, ...
    fraction_below: dict[str, float]  # "p1" -> fraction of query images with NN distance <= that
    exact_copies: int  # query images within `copy_tolerance` of a training image
    nearest_distance: np.ndarray  # per query image
    nearest_index: np.ndarray  # per query image, index into the training set
    train_nn_median: float
    query_nn_median: float
    closest_pairs: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready numbers (no per-image arrays)."""
        return {
            "train_nn_percentiles": self.percentiles,
            "fraction_below": self.fraction_below,
            "exact_copies": self.exact_copies,
            "train_nn_median": self.train_nn_median,
            "nn_median": self.query_nn_median,
            "nn_median_ratio": self.query_nn_median / self.train_nn_median if self.train_nn_median > 0 else None,
            "closest_pairs": self.closest_pairs,
        }


def train_nn_distances(train: np.ndarray) -> np.ndarray:
    """Leave-one-out nearest-neighbour distance of every training image."""
    if len(train) < 2:
        raise ValueError(f"memorisation needs at least 2 training images; got {len(train)}")
    distances = rms_distances(train, train)
    np.fill_diagonal(distances, np.inf)
    return distances.min(axis=1)


def memorisation(
    query: np.ndarray,
    train: np.ndarray,
    query_names: list[str] | None = None,
    train_names: list[str] | None = None,
    percentiles: tuple[float, ...] = (1.0, 5.0),
    copy_tolerance: float = 0.01,
    num_closest: int = 8,
) -> MemorisationResult:
    """Nearest-training-image distances of `query` (synthetic images, or real held-out images for
    the floor) against the train-to-train nearest-neighbour distribution."""
    if len(query) == 0:
        raise ValueError("memorisation needs at least one query image")
    query_names = query_names or [str(i) for i in range(len(query))]
    train_names = train_names or [str(i) for i in range(len(train))]
    reference = train_nn_distances(train)
    to_train = rms_distances(query, train)
    nearest_index = to_train.argmin(axis=1)
    nearest_distance = to_train[np.arange(len(query)), nearest_index]

    thresholds = {f"p{p:g}": float(np.percentile(reference, p)) for p in percentiles}
    # `<=` so that an exact copy counts even when the training set itself holds duplicates (p1 = 0).
    fraction_below = {name: float((nearest_distance <= value).mean()) for name, value in thresholds.items()}
    exact_copies = int((nearest_distance <= copy_tolerance).sum())
    # Every copy is named, however many, and at least the `num_closest` closest pairs.
    order = np.argsort(nearest_distance, kind="stable")[: max(num_closest, exact_copies)]
    closest = [
        {
            "image": query_names[i],
            "nearest_train": train_names[nearest_index[i]],
            "distance": float(nearest_distance[i]),
        }
        for i in order
    ]
    return MemorisationResult(
        percentiles=thresholds,
        fraction_below=fraction_below,
        exact_copies=exact_copies,
        nearest_distance=nearest_distance,
        nearest_index=nearest_index,
        train_nn_median=float(np.median(reference)),
        query_nn_median=float(np.median(nearest_distance)),
        closest_pairs=closest,
    )
