"""Mixing real and synthetic images for one sweep item, and the torch dataset that reads them.

Rule (DESIGN.md, issue 4): ratio r adds round(r x n_real_c) synthetic images of class c to the
TRAINING split only; validation and test stay real. r = 1.0 means as many synthetic as real images,
as in the reference study. Rounding is half-up (0.5 -> 1), not Python's banker's rounding.

The synthetic images of one class are drawn by a seeded permutation and the first k are taken, so
for a fixed seed a smaller ratio's synthetic set is contained in a larger ratio's set: the paired
comparison against ratio 0 changes one thing (how many synthetic images), not which ones.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ctsynth.data.preprocess import preprocess_bytes

log = logging.getLogger(__name__)

REAL, SYNTHETIC = "real", "synthetic"


@dataclass(frozen=True)
class ImageItem:
    path: Path
    label: str
    label_id: int
    source: str  # "real" or "synthetic"


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


def synthetic_count(ratio: float, n_real: int) -> int:
    """round(ratio x n_real), half-up."""
    if ratio < 0:
        raise ValueError(f"synthetic ratio must be >= 0, got {ratio}")
    return int(math.floor(ratio * n_real + 0.5 + 1e-9))


def class_seed(seed: int, label: str) -> int:
    """A per-class seed that does not depend on the order of data.classes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{label}".encode()).digest()[:8], "little")


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


def count_by_class_and_source(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for item in items:
        counts.setdefault(item.label, {REAL: 0, SYNTHETIC: 0})[item.source] += 1
    return counts


class ImageDataset(Dataset):
    """Reads each PNG once through preprocess_bytes (the one preprocessing function) and keeps the
    model inputs in memory (a few hundred small images).

    Train-time augmentation (augment=True): a random shift of up to `max_shift` pixels in each
    direction with black (air) fill, the way a slice can sit off-centre in the field of view. No
    flips (anatomy has a left and right) and no intensity changes (the lung window is fixed).
    """

    def __init__(self, items: list[ImageItem], resolution: int, augment: bool = False, max_shift: int = 0) -> None:
        self.items = items
        self.augment = augment and max_shift > 0
        self.max_shift = max_shift
        inputs = []
        for item in items:
            try:
                inputs.append(preprocess_bytes(item.path.read_bytes(), resolution))
            except Exception as exc:
                raise ValueError(f"cannot read training image {item.path}: {exc}") from exc
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
