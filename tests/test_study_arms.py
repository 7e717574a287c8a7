"""The arms' training sets: count matching (size and optimiser steps), duplicate/classic draws,
the oracle pool, and, trained for real on tiny data, noise never 'helps' and a copy of the real
images is indistinguishable from `duplicate`."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from _classifier_data import CLASSES, write_prepared, write_synthetic
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from ctsynth.classifier.stats import paired_bootstrap
from ctsynth.classifier.train import train_classifier
from ctsynth.config import ClassifierParams, Params
from ctsynth.data.mixing import (
    ImageDataset,
    classic_augment,
    count_by_class_and_source,
    load_arm_data,
    oracle_pool,
    real_split,
    synthetic_pool,
    training_set,
)

ARMS = ("synthetic", "duplicate", "classic", "oracle")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    prepared = write_prepared(root, {"train": (10, 11), "valid": (6, 6), "test": (20, 20)}, size=16)
    synthetic = write_synthetic(root, per_class=24, size=16)
    oracle = write_prepared(root / "o", {"train": (24, 24)}, size=16, seed=9)
    return root, prepared, synthetic, oracle


def _pools(synthetic, oracle):
    return {"synthetic": synthetic_pool(synthetic, CLASSES), "oracle": oracle_pool(oracle, CLASSES)[0]}


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_every_arm_has_the_same_size_and_optimiser_steps_as_synthetic(data, ratio):
    root, prepared, synthetic, oracle = data
    real_train = real_split(prepared, "train", CLASSES)
    pools = _pools(synthetic, oracle)
    sets = {arm: training_set(arm, real_train, pools, ratio, 0, CLASSES) for arm in ARMS}
    sizes = {arm: {c: sum(item.label == c for item in items) for c in CLASSES} for arm, items in sets.items()}
    assert all(size == sizes["synthetic"] for size in sizes.values()), sizes
    assert all(count_by_class_and_source(items)["normal"]["real"] == 10 for items in sets.values())
    # optimiser steps counted by a hook on every optimiser step, full epochs (no early stop)
    steps = {}
    params = ClassifierParams(resolution=16, epochs=2, patience=2, batch_size=8, feature_cache=str(root / "cache"))
    valid, test = real_split(prepared, "valid", CLASSES), real_split(prepared, "test", CLASSES)
    for arm, items in sets.items():
        count = [0]
        handle = register_optimizer_step_post_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        try:
            train_classifier(params, items, valid, test, CLASSES, seed=0, progress=False)
        finally:
            handle.remove()
        steps[arm] = count[0]
    assert len(set(steps.values())) == 1 and steps["synthetic"] > 0, steps


def test_duplicate_and_classic_draw_the_same_real_images_and_classic_changes_them(data):
    _, prepared, _, _ = data
    real_train = real_split(prepared, "train", CLASSES)
    dup = training_set("duplicate", real_train, {}, 2.0, 3, CLASSES)[len(real_train):]
    classic = training_set("classic", real_train, {}, 2.0, 3, CLASSES)[len(real_train):]
    assert [i.path for i in dup] == [i.path for i in classic]
    # 2 x 10 normal copies: every real image twice before any thrice
    normal = pd.Series([str(i.path) for i in dup if i.label == "normal"]).value_counts()
    assert len(normal) == 10 and set(normal) == {2}
    plain, augmented = ImageDataset(dup[:3], 16).inputs, ImageDataset(classic[:3], 16).inputs
    assert not torch.equal(plain, augmented) and augmented.min() >= -1 and augmented.max() <= 1
    assert torch.equal(augmented, ImageDataset(classic[:3], 16).inputs)  # a copy is always the same image
    smaller = training_set("duplicate", real_train, {}, 0.5, 3, CLASSES)[len(real_train):]
    for c in CLASSES:  # nested across ratios: the smaller ratio's copies start the larger one's
        small_c, large_c = [i.path for i in smaller if i.label == c], [i.path for i in dup if i.label == c]
        assert small_c == large_c[: len(small_c)]


def test_classic_augment_ops_and_errors():
    x = np.full((1, 16, 16), -1.0, np.float32)
    x[:, 4:12, 2:6] = 0.5
    flipped = [classic_augment(x, ["hflip"], s) for s in range(8)]
    assert any(np.array_equal(f, x[:, :, ::-1]) for f in flipped) and any(np.array_equal(f, x) for f in flipped)
    assert classic_augment(x, ["rotate", "scale", "elastic", "intensity"], 1).shape == x.shape
    with pytest.raises(ValueError, match="unknown classic augmentation"):
        classic_augment(x, ["blur"], 0)


def test_oracle_holdout_leaves_every_arms_training_split(data, tmp_path):
    from ctsynth.data.oracle import build_oracle

    root, prepared, synthetic, _ = data
    params = Params.model_validate({"sweep": {"ratios": [0.0, 1.0], "oracle_source": "holdout", "oracle": str(tmp_path / "oracle")},
                                    "data": {"prepared": str(prepared)}})
    build_oracle(params, tmp_path)
    pool, held_out = oracle_pool(tmp_path / "oracle", CLASSES)
    assert {c: len(pool[c]) for c in CLASSES} == {"normal": 5, "squamous": 6} and len(held_out) == 11  # half, rounded up
    real_train, pools = load_arm_data("oracle", prepared, synthetic, tmp_path / "oracle", CLASSES)
    assert len(real_train) == 10 and not {i.path.relative_to(prepared).as_posix() for i in real_train} & held_out
    with pytest.raises(ValueError, match="needs 5 oracle 'normal' images .* has 5|needs 6 oracle"):
        training_set("oracle", real_train, pools, 1.2, 0, CLASSES)
    # rerun replaces its own output; a foreign folder is refused
    build_oracle(params, tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by the oracle stage"):
        build_oracle(params.model_copy(update={"sweep": params.sweep.model_copy(update={"oracle": str(foreign)})}), tmp_path)
    assert (foreign / "keep.txt").read_text() == "mine"


def _train_arm(arm, real_train, pools, prepared, root, seeds):
    params = ClassifierParams(resolution=16, epochs=8, patience=8, batch_size=8, learning_rate=0.01, augment=False, feature_cache=str(root / "cache"))
    valid, test = real_split(prepared, "valid", CLASSES), real_split(prepared, "test", CLASSES)
    out = {}
    for seed in seeds:
        items = training_set(arm, real_train, pools, 1.0, seed, CLASSES)
        result = train_classifier(params, items, valid, test, CLASSES, seed=seed, progress=False)
        out[seed] = result.test_probabilities
    return out, result.test_labels


def _write_pool(root, name, images):
    folder = root / name
    rows = []
    for label_id, label in enumerate(CLASSES):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(images[label]):
            Image.fromarray(pixels, mode="L").save(folder / label / f"{i:03d}.png")
            rows.append({"path": f"{label}/{i:03d}.png", "label": label, "label_id": label_id})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.mark.slow  # 15 trainings: minutes on 2 shared cores
def test_noise_does_not_help_and_a_copy_of_the_real_images_equals_duplicate(data):
    root, prepared, _, _ = data
    real_train = real_split(prepared, "train", CLASSES)
    rng = np.random.default_rng(0)
    noise = _write_pool(root, "noise", {c: [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(11)] for c in CLASSES})
    copies = root / "copies"
    shutil.copytree(prepared / "train", copies)
    pd.DataFrame([{"path": f"{c}/{p.name}", "label": c, "label_id": i} for i, c in enumerate(CLASSES) for p in sorted((copies / c).glob("*.png"))]).to_csv(copies / "manifest.csv", index=False)
    seeds = range(5)
    duplicate, labels = _train_arm("duplicate", real_train, {}, prepared, root, seeds)
    noisy, _ = _train_arm("synthetic", real_train, {"synthetic": synthetic_pool(noise, CLASSES)}, prepared, root, seeds)
    copied, _ = _train_arm("synthetic", real_train, {"synthetic": synthetic_pool(copies, CLASSES)}, prepared, root, seeds)
    versus_noise = paired_bootstrap("balanced_accuracy", labels, noisy, duplicate, CLASSES, replicates=1000)
    assert not (versus_noise.p_value < 0.05 and versus_noise.difference > 0), versus_noise
    versus_copy = paired_bootstrap("balanced_accuracy", labels, copied, duplicate, CLASSES, replicates=1000)
    assert versus_copy.p_value >= 0.05 and versus_copy.low <= 0 <= versus_copy.high, versus_copy


def test_oracle_phantom_pool_is_new_prepared_slices_and_a_rerun_replaces_it(data, tmp_path):
    from ctsynth.data.oracle import build_oracle

    _, prepared, _, _ = data
    params = Params.model_validate({"data": {"prepared": str(prepared), "resolution": 16},
                                    "sweep": {"ratios": [0.0, 0.5], "oracle_source": "phantom", "oracle": str(tmp_path / "oracle")}})
    for _ in range(2):  # the second run replaces the first run's output (prepare never writes into it directly)
        build_oracle(params, tmp_path)
        pool, held_out = oracle_pool(tmp_path / "oracle", CLASSES)
        assert {c: len(pool[c]) for c in CLASSES} == {"normal": 5, "squamous": 6} and not held_out  # round(0.5 x n_c)
        import hashlib

        real = {hashlib.sha256(p.read_bytes()).digest() for p in prepared.rglob("*.png")}
        oracle = [hashlib.sha256(item.path.read_bytes()).digest() for c in CLASSES for item in pool[c]]
        assert len(set(oracle)) == len(oracle) and not set(oracle) & real  # new genuine images, none a copy
