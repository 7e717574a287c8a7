from pathlib import Path

import pytest
from _classifier_data import CLASSES, write_prepared, write_synthetic

from ctsynth.data.mixing import (
    ImageDataset,
    count_by_class_and_source,
    mix_training_set,
    real_split,
    shift_with_air,
    synthetic_count,
    synthetic_pool,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    prepared = write_prepared(root, {"train": (20, 22), "valid": (3, 3), "test": (4, 4)}, size=16)
    synthetic = write_synthetic(root, per_class=25, size=16)
    return prepared, synthetic


def test_synthetic_count_rounds_half_up():
    assert synthetic_count(0.0, 22) == 0
    assert synthetic_count(0.25, 22) == 6  # 5.5 -> 6
    assert synthetic_count(0.25, 18) == 5  # 4.5 -> 5 (Python round() would give 4)
    assert synthetic_count(0.5, 21) == 11
    assert synthetic_count(1.0, 148) == 148
    with pytest.raises(ValueError, match=">= 0"):
        synthetic_count(-0.1, 10)


@pytest.mark.parametrize("ratio, expected", [(0.0, {"normal": 0, "squamous": 0}), (0.25, {"normal": 5, "squamous": 6}), (1.0, {"normal": 20, "squamous": 22})])
def test_mixing_adds_round_ratio_times_real_per_class_to_train_only(data, ratio, expected):
    prepared, synthetic = data
    real_train = real_split(prepared, "train", CLASSES)
    mixed = mix_training_set(real_train, synthetic_pool(synthetic, CLASSES), ratio, seed=3, classes=CLASSES)
    counts = count_by_class_and_source(mixed)
    assert {c: counts[c]["synthetic"] for c in CLASSES} == expected
    assert {c: counts[c]["real"] for c in CLASSES} == {"normal": 20, "squamous": 22}
    # valid and test come from the manifest only: always real
    assert all(item.source == "real" for split in ("valid", "test") for item in real_split(prepared, split, CLASSES))


def test_mixing_is_deterministic_by_seed_and_nested_across_ratios(data):
    prepared, synthetic = data
    real_train, pool = real_split(prepared, "train", CLASSES), synthetic_pool(synthetic, CLASSES)
    pick = lambda ratio, seed: {i.path for i in mix_training_set(real_train, pool, ratio, seed, CLASSES) if i.source == "synthetic"}  # noqa: E731
    assert pick(0.5, 1) == pick(0.5, 1)
    assert pick(0.5, 1) != pick(0.5, 2)
    assert pick(0.25, 1) < pick(0.5, 1) < pick(1.0, 1)


def test_mixing_fails_clearly_when_synthetic_images_are_missing(data):
    prepared, synthetic = data
    real_train = real_split(prepared, "train", CLASSES)
    with pytest.raises(ValueError, match=r"needs 30 synthetic 'normal' images .* has 25"):
        mix_training_set(real_train, synthetic_pool(synthetic, CLASSES), 1.5, seed=0, classes=CLASSES)


def test_manifest_errors_name_the_file(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label\nx.png,normal\n")
    with pytest.raises(ValueError, match=r"manifest.csv lacks columns \['label_id'\]"):
        synthetic_pool(tmp_path, CLASSES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        real_split(tmp_path / "nowhere", "train", CLASSES)


def test_dataset_reads_through_preprocess_bytes_and_shift_fills_with_air(data):
    prepared, _ = data
    dataset = ImageDataset(real_split(prepared, "valid", CLASSES), resolution=24)
    x, y = dataset[0]
    assert x.shape == (1, 24, 24) and x.min() >= -1 and x.max() <= 1 and int(y) == 0
    shifted = shift_with_air(x, 2, -3)
    assert (shifted[:, :2, :] == -1).all() and (shifted[:, :, -3:] == -1).all()
    assert (shifted[:, 2:, :-3] == x[:, :-2, 3:]).all()
