"""Tiny prepared + synthetic data sets in the pipeline's layouts, for the classifier tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CLASSES = ["normal", "squamous"]


def _image(rng: np.random.Generator, label_id: int, size: int) -> np.ndarray:
    """Noise; class 1 carries a bright disc somewhere near the middle (learnable in seconds)."""
    pixels = rng.normal(90, 25, (size, size))
    if label_id == 1:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 6) ** 2] += 110
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_prepared(root: Path, counts: dict[str, tuple[int, int]] | None = None, size: int = 32, seed: int = 0) -> Path:
    """data/prepared/{split}/{class}/*.png + manifest.csv; counts: split -> (n_normal, n_squamous)."""
    counts = counts or {"train": (20, 22), "valid": (6, 6), "test": (8, 10)}
    rng = np.random.default_rng(seed)
    folder = root / "data" / "prepared"
    rows = []
    for split, per_class in counts.items():
        for label_id, (label, n) in enumerate(zip(CLASSES, per_class)):
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                relative = f"{split}/{label}/{label}_{i:03d}.png"
                Image.fromarray(_image(rng, label_id, size), mode="L").save(folder / relative)
                rows.append({"path": relative, "split": split, "label": label, "label_id": label_id, "status": "ok"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def write_synthetic(root: Path, per_class: int = 25, size: int = 32, seed: int = 1) -> Path:
    """data/synthetic/{class}/*.png + manifest.csv (path relative to data/synthetic)."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / "synthetic"
    rows = []
    for label_id, label in enumerate(CLASSES):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            relative = f"{label}/seed{i:04d}.png"
            Image.fromarray(_image(rng, label_id, size), mode="L").save(folder / relative)
            rows.append({"path": relative, "label": label, "label_id": label_id, "seed": i})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder
