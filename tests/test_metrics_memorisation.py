"""Memorisation: an exact copy of a training image is flagged; fresh samples are not."""

from __future__ import annotations

import numpy as np
import pytest

from ctsynth.metrics import memorisation


def _images(rng, n, side=16):
    return rng.uniform(-1, 1, size=(n, 1, side, side)).astype(np.float32)


def test_memorisation_flags_an_exact_copy_and_names_it():
    rng = np.random.default_rng(0)
    train = _images(rng, 60)
    synthetic = np.concatenate([_images(rng, 39), train[7:8]])
    train_names = [f"train/normal/{i:03d}.png" for i in range(60)]
    synthetic_names = [f"normal/{i:03d}.png" for i in range(40)]
    result = memorisation(synthetic, train, synthetic_names, train_names)
    assert result.exact_copies == 1
    assert result.closest_pairs[0] == {"image": "normal/039.png", "nearest_train": "train/normal/007.png", "distance": 0.0}
    # The copy is below the 1st percentile of train-train NN distances; a fresh sample lands there
    # about 1 % of the time, so at most one or two more of 39 do.
    assert 1 / 40 <= result.fraction_below["p1"] <= 3 / 40
    assert result.nearest_distance[39] == 0.0
    assert result.summary()["exact_copies"] == 1


def test_fresh_samples_from_the_training_distribution_are_not_flagged():
    rng = np.random.default_rng(1)
    train = _images(rng, 80)
    fresh = _images(rng, 80)
    result = memorisation(fresh, train)
    assert result.exact_copies == 0
    assert result.fraction_below["p1"] <= 0.05
    # Fresh samples sit about as far from the training set as training images from each other.
    assert 0.9 < result.summary()["nn_median_ratio"] < 1.1


def test_near_copy_counts_below_the_percentile_but_not_as_exact():
    rng = np.random.default_rng(2)
    train = _images(rng, 50)
    near = np.clip(train[:5] + rng.normal(scale=0.05, size=train[:5].shape), -1, 1).astype(np.float32)
    result = memorisation(near, train, copy_tolerance=0.01)
    assert result.exact_copies == 0
    assert result.fraction_below["p1"] == 1.0


def test_memorisation_rejects_images_of_different_sizes():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="differ in size"):
        memorisation(_images(rng, 3, side=8), _images(rng, 5, side=16))
