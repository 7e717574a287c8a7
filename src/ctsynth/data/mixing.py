"""The training set of one sweep item (arm, ratio, seed), and the torch dataset that reads it.

Every arm starts from the real training split and adds k_c = round(r x n_c) images to class c
(n_c real training images of class c; r = the item's ratio; half-up rounding, 0.5 -> 1). Only the
kind of the added images differs, so every arm at one ratio has the same training-set size, hence
the same optimiser steps per epoch and the same shift augmentation:

    real            r = 0: the real training images only (one baseline shared by every arm)
    synthetic       + k_c synthetic images of class c (the GAN's, data/synthetic)
    duplicate       + k_c extra draws of real class-c images (the count control: more of the same)
    classic         + k_c classically augmented copies of real class-c images (flip, rotation,
                      scale, intensity, elastic: the ops named in sweep.classic_augmentation)
    oracle          + k_c NEW genuine class-c images (positive control: perfect synthetic data)
    synthetic_only  k_c synthetic images of class c and no real image (train-synthetic-test-real)

Validation and test are always the real splits.

The added images of one class are taken in the order of a seeded permutation, so for a fixed seed
a smaller ratio's additions are contained in a larger ratio's: comparing ratios changes how many
images are added, not which. `duplicate` and `classic` draw the same real images (classic then
augments them), so these two arms differ by the augmentation only.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ctsynth import config
from ctsynth.data.preprocess import preprocess_bytes

log = logging.getLogger(__name__)

# Where a training image comes from (ImageItem.source) and, for the arms, what the arm adds.
REAL, SYNTHETIC, DUPLICATE, CLASSIC, ORACLE = "real", "synthetic", "duplicate", "classic", "oracle"
SYNTHETIC_ONLY = "synthetic_only"
BASELINE_ARM = REAL  # ratio 0: no image added, one set shared by every arm
ARMS = config.ARMS  # sweep.arms' choices (config.Arm); the names above are its members
CLASSIC_OPS = config.CLASSIC_OPS


@dataclass(frozen=True)
class ImageItem:
    path: Path
    label: str
    label_id: int
    source: str  # real | synthetic | duplicate | classic | oracle
    # classic arm: this copy is the image after classic_augment(ops, seed), fixed once at load time
    augment_ops: tuple[str, ...] = ()
    augment_seed: int | None = None


def _read_manifest(manifest: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    frame = pd.read_csv(manifest)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest {manifest} lacks columns {missing} (has {list(frame.columns)})")
    if "status" in frame.columns:
        # prepare records files it could not use; only usable ones enter training.
        frame = frame[frame["status"].fillna("ok").astype(str).isin(["ok", "OK", "kept", "valid"])]
    return frame


def _items(frame: pd.DataFrame, base: Path, classes: list[str], source: str, manifest: Path) -> list[ImageItem]:
    items = []
    for row in frame.itertuples(index=False):
        label = str(row.label)
        if label not in classes:
            raise ValueError(f"manifest {manifest}: label {label!r} of {row.path} is not in data.classes {classes}")
        label_id = classes.index(label)
        if int(row.label_id) != label_id:
            raise ValueError(
                f"manifest {manifest}: {row.path} has label_id {row.label_id} but {label!r} is class {label_id} of {classes}"
            )
        path = Path(str(row.path))
        items.append(ImageItem(path if path.is_absolute() else base / path, label, label_id, source))
    return sorted(items, key=lambda item: str(item.path))


def real_split(prepared_dir: Path, split: str, classes: list[str]) -> list[ImageItem]:
    """The real images of `split` listed in data/prepared/manifest.csv (paths relative to it)."""
    manifest = prepared_dir / "manifest.csv"
    frame = _read_manifest(manifest, ("path", "split", "label", "label_id"))
    frame = frame[frame["split"] == split]
    outside = frame[~frame["label"].isin(classes)]
    if len(outside):
        log.info("%s: %d %s images of classes outside data.classes skipped", manifest, len(outside), split)
    frame = frame[frame["label"].isin(classes)]
    items = _items(frame, prepared_dir, classes, REAL, manifest)
    if not items:
        raise ValueError(f"manifest {manifest} lists no usable images for split {split!r}")
    return items


def synthetic_pool(synthetic_dir: Path, classes: list[str]) -> dict[str, list[ImageItem]]:
    """Synthetic images per class from data/synthetic/manifest.csv (paths relative to it)."""
    manifest = synthetic_dir / "manifest.csv"
    frame = _read_manifest(manifest, ("path", "label", "label_id"))
    items = _items(frame[frame["label"].isin(classes)], synthetic_dir, classes, SYNTHETIC, manifest)
    return {c: [item for item in items if item.label == c] for c in classes}


def oracle_pool(oracle_dir: Path, classes: list[str]) -> tuple[dict[str, list[ImageItem]], set[str]]:
    """The oracle stage's extra genuine images per class (data/oracle/manifest.csv, prepared
    layout), and the prepared-relative paths of real train images held out to make them (empty for
    phantom images; on a real data set the pool is a held-out part of the train split)."""
    manifest = oracle_dir / "manifest.csv"
    frame = _read_manifest(manifest, ("path", "split", "label", "label_id"))
    frame = frame[frame["label"].isin(classes)]
    items = _items(frame, oracle_dir, classes, ORACLE, manifest) if len(frame) else []
    held_out = set(frame["holdout_of"].dropna().astype(str)) if "holdout_of" in frame.columns else set()
    return {c: [item for item in items if item.label == c] for c in classes}, held_out


def load_arm_data(
    arm: str, prepared_dir: Path, synthetic_dir: Path, oracle_dir: Path, classes: list[str]
) -> tuple[list[ImageItem], dict[str, dict[str, list[ImageItem]]]]:
    """(real training images, pools) that `training_set(arm, ...)` needs, read from disk.

    When the oracle pool is a held-out part of the train split (a real data set), those images
    leave the real training split of EVERY arm, the baseline included, so no arm sees them twice
    and all arms share one smaller baseline.
    """
    real_train = real_split(prepared_dir, "train", classes)
    pools: dict[str, dict[str, list[ImageItem]]] = {}
    if (oracle_dir / "manifest.csv").is_file():
        oracle, held_out = oracle_pool(oracle_dir, classes)
        if held_out:
            real_train = [item for item in real_train if item.path.relative_to(prepared_dir).as_posix() not in held_out]
        if arm == ORACLE:
            pools[ORACLE] = oracle
    elif arm == ORACLE:
        raise FileNotFoundError(f"the oracle arm needs {oracle_dir}/manifest.csv: run the `oracle` stage (dvc repro oracle)")
    if arm in (SYNTHETIC, SYNTHETIC_ONLY):
        pools[SYNTHETIC] = synthetic_pool(synthetic_dir, classes)
    return real_train, pools


def synthetic_count(ratio: float, n_real: int) -> int:
    """round(ratio x n_real), half-up."""
    if ratio < 0:
        raise ValueError(f"synthetic ratio must be >= 0, got {ratio}")
    return int(math.floor(ratio * n_real + 0.5 + 1e-9))


def class_seed(seed: int, label: str, stream: str = "") -> int:
    """A per-class seed that does not depend on the order of data.classes. `stream` separates the
    draws of different pools (the real images duplicated vs. the synthetic images picked)."""
    key = f"{seed}:{label}" if not stream else f"{seed}:{label}:{stream}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def mix_training_set(
    real_train: list[ImageItem],
    pool: dict[str, list[ImageItem]],
    ratio: float,
    seed: int,
    classes: list[str],
) -> list[ImageItem]:
    """Real training images plus round(ratio x n_real_c) seeded synthetic images of each class c."""
    mixed = list(real_train)
    for label in classes:
        n_real = sum(1 for item in real_train if item.label == label)
        wanted = synthetic_count(ratio, n_real)
        if wanted == 0:
            continue
        available = pool.get(label, [])
        if len(available) < wanted:
            raise ValueError(
                f"ratio {ratio} needs {wanted} synthetic '{label}' images ({n_real} real x {ratio}) but the "
                f"synthetic manifest has {len(available)}; generate more (generate stage) or lower sweep.ratios"
            )
        order = np.random.default_rng(class_seed(seed, label)).permutation(len(available))
        mixed += [available[i] for i in order[:wanted]]
        log.info("class %s: %d real + %d synthetic (ratio %g, seed %d)", label, n_real, wanted, ratio, seed)
    return mixed


def _draw(available: list[ImageItem], wanted: int, seed: int, label: str, stream: str) -> list[ImageItem]:
    """The first `wanted` items of seeded permutations of `available`, one permutation after the
    other when more are wanted than exist (each image then appears once more before any thrice)."""
    rng = np.random.default_rng(class_seed(seed, label, stream))
    order: list[int] = []
    while len(order) < wanted:
        order += rng.permutation(len(available)).tolist()
    return [available[i] for i in order[:wanted]]


def training_set(
    arm: str,
    real_train: list[ImageItem],
    pools: dict[str, dict[str, list[ImageItem]]],
    ratio: float,
    seed: int,
    classes: list[str],
    classic_ops: tuple[str, ...] | list[str] = ("rotate", "scale", "intensity", "elastic"),
) -> list[ImageItem]:
    """The training images of the sweep item (arm, ratio, seed); see the module docstring.

    `pools` maps a pool name to its images per class: "synthetic" (synthetic and synthetic_only)
    and "oracle" (oracle); the real arms need none. Ratio 0 is the real baseline for every arm.
    """
    if arm not in (*ARMS, BASELINE_ARM):
        raise ValueError(f"unknown sweep arm {arm!r}; arms are {[BASELINE_ARM, *ARMS]}")
    if arm == BASELINE_ARM and ratio != 0:
        raise ValueError(f"arm {BASELINE_ARM!r} is the ratio-0 baseline; got ratio {ratio}")
    if arm == SYNTHETIC:
        return mix_training_set(real_train, pools.get(SYNTHETIC, {}), ratio, seed, classes)
    added: list[ImageItem] = []
    for label in classes:
        real_c = [item for item in real_train if item.label == label]
        wanted = synthetic_count(ratio, len(real_c))
        if wanted == 0:
            continue
        if arm in (DUPLICATE, CLASSIC):
            if not real_c:
                raise ValueError(f"arm {arm} needs real '{label}' training images to copy; the training split has none")
            drawn = _draw(real_c, wanted, seed, label, "real-copies")
            if arm == DUPLICATE:
                added += [replace(item, source=DUPLICATE) for item in drawn]
            else:
                # Each copy gets its own augmentation draw: copy j of seed s is always the same image.
                added += [replace(item, source=CLASSIC, augment_ops=tuple(classic_ops), augment_seed=class_seed(seed, label, f"classic-{j}"))
                          for j, item in enumerate(drawn)]
        else:  # oracle, synthetic_only: images from a pool
            pool_name = ORACLE if arm == ORACLE else SYNTHETIC
            available = pools.get(pool_name, {}).get(label, [])
            if len(available) < wanted:
                raise ValueError(
                    f"arm {arm} at ratio {ratio} needs {wanted} {pool_name} '{label}' images ({len(real_c)} real x {ratio}) "
                    f"but the {pool_name} pool has {len(available)}; "
                    + ("generate more (generate stage) or lower sweep.ratios" if pool_name == SYNTHETIC
                       else "raise sweep.oracle (more phantom images, or a larger holdout) or lower sweep.ratios")
                )
            order = np.random.default_rng(class_seed(seed, label)).permutation(len(available))
            added += [available[i] for i in order[:wanted]]
        log.info("class %s: arm %s adds %d images to %d real (ratio %g, seed %d)", label, arm, wanted, len(real_c), ratio, seed)
    if arm == SYNTHETIC_ONLY:
        return added
    return list(real_train) + added


def count_by_class_and_source(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for item in items:
        per_source = counts.setdefault(item.label, {REAL: 0, SYNTHETIC: 0})
        per_source[item.source] = per_source.get(item.source, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------
# Classic augmentation (the `classic` arm): one fixed random transform per added copy.


def classic_augment(x: np.ndarray, ops: tuple[str, ...] | list[str], seed: int) -> np.ndarray:
    """One classically augmented copy of a C x H x W model input in [-1, 1] (-1 = air).

    hflip: left-right mirror (p = 0.5); rotate: +-10 degrees; scale: x0.9-1.1 about the centre;
    intensity: contrast x0.9-1.1 and brightness +-0.1; elastic: a smooth random displacement field
    (Simard et al. 2003) of about 1.5 % of the side. Geometry fills with air; values stay in [-1, 1].
    """
    from scipy import ndimage

    unknown = [op for op in ops if op not in CLASSIC_OPS]
    if unknown:
        raise ValueError(f"unknown classic augmentation op(s) {unknown}; known: {list(CLASSIC_OPS)}")
    rng = np.random.default_rng(seed)
    out = np.asarray(x, dtype=np.float32).copy()
    _, h, w = out.shape
    if "hflip" in ops and rng.random() < 0.5:
        out = out[:, :, ::-1].copy()
    angle = np.deg2rad(rng.uniform(-10, 10)) if "rotate" in ops else 0.0
    scale = rng.uniform(0.9, 1.1) if "scale" in ops else 1.0
    if angle or scale != 1.0:
        # output pixel o reads input pixel M (o - c) + c: rotation by angle, zoom by scale
        c, s = np.cos(angle) / scale, np.sin(angle) / scale
        matrix = np.array([[c, -s], [s, c]])
        centre = np.array([(h - 1) / 2, (w - 1) / 2])
        offset = centre - matrix @ centre
        out = np.stack([ndimage.affine_transform(ch, matrix, offset, order=1, cval=-1.0) for ch in out])
    if "elastic" in ops:
        sigma, alpha = max(h, w) / 16, max(h, w) * 0.015
        dy, dx = (ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) for _ in range(2))
        # normalise so the largest displacement is alpha pixels whatever sigma smoothed away
        dy, dx = (d * alpha / max(float(np.abs(d).max()), 1e-12) for d in (dy, dx))
        yy, xx = np.mgrid[:h, :w]
        out = np.stack([ndimage.map_coordinates(ch, [yy + dy, xx + dx], order=1, cval=-1.0) for ch in out])
    if "intensity" in ops:
        contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)
        out = contrast * out + brightness
    return np.clip(out, -1.0, 1.0).astype(np.float32)


class ImageDataset(Dataset):
    """Reads each PNG once through preprocess_bytes (the one preprocessing function) and keeps the
    model inputs in memory (a few hundred small images).

    Train-time augmentation (augment=True): a random shift of up to `max_shift` pixels in each
    direction with black (air) fill, the way a slice can sit off-centre in the field of view, for
    every image of every arm alike. A `classic` arm copy is its classic_augment transform, fixed
    when the copy is read (offline augmentation, as in the literature the arm stands for).
    """

    def __init__(self, items: list[ImageItem], resolution: int, augment: bool = False, max_shift: int = 0) -> None:
        self.items = items
        self.augment = augment and max_shift > 0
        self.max_shift = max_shift
        inputs = []
        for item in items:
            try:
                pixels = preprocess_bytes(item.path.read_bytes(), resolution)
            except Exception as exc:
                raise ValueError(f"cannot read training image {item.path}: {exc}") from exc
            if item.augment_seed is not None:
                pixels = classic_augment(pixels, item.augment_ops, item.augment_seed)
            inputs.append(pixels)
        self.inputs = torch.from_numpy(np.stack(inputs)) if inputs else torch.empty(0, 1, resolution, resolution)
        self.labels = torch.tensor([item.label_id for item in items], dtype=torch.long)
        self.generator = torch.Generator()

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inputs[index]
        if self.augment:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=self.generator).tolist()
            x = shift_with_air(x, dy, dx)
        return x, self.labels[index]


def shift_with_air(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift a C x H x W input by (dy, dx) pixels, filling with -1 (black = air)."""
    out = torch.full_like(x, -1.0)
    _, h, w = x.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = x[:, ys, xs]
    return out
