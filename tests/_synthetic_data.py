"""Tiny prepared + synthetic folders for the validate_synthetic tests: 32 px toy chest slices
(body ellipse, two lung fields, a bright mass for `squamous`), written as the stages write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ctsynth.data.manifest import MANIFEST_COLUMNS, phash, sha256_bytes, write_manifest

CLASSES = ["normal", "squamous"]


def toy_slice(rng: np.random.Generator, label: str, side: int = 32, blur: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1) * 2 - 1
    image = np.zeros((side, side))
    body = (xx / rng.uniform(0.75, 0.95)) ** 2 + (yy / rng.uniform(0.55, 0.75)) ** 2 < 1
    image[body] = 0.85
    for centre in (-0.4, 0.4):
        cx = centre + rng.uniform(-0.08, 0.08)
        lung = ((xx - cx) / rng.uniform(0.22, 0.32)) ** 2 + (yy / rng.uniform(0.35, 0.5)) ** 2 < 1
        image[lung] = 0.35
    if label == "squamous":
        mx, my = rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)
        image[(xx - mx) ** 2 + (yy - my) ** 2 < rng.uniform(0.01, 0.03)] = 0.95
    image += rng.normal(scale=0.04, size=image.shape) * body
    if blur:  # a "bad generator": blurred texture
        image = (image + np.roll(image, 1, 0) + np.roll(image, 1, 1) + np.roll(image, (1, 1), (0, 1))) / 4
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _save(pixels: np.ndarray, path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)
    return path.read_bytes()


def write_prepared(root: Path, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    per_class = per_class or {"train": 40, "valid": 6}
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in per_class.items():
        for label_id, label in enumerate(CLASSES):
            for i in range(count):
                pixels = toy_slice(rng, label)
                rel = f"{split}/{label}/{label}_{i:03d}.png"
                data = _save(pixels, root / rel)
                rows.append(
                    {
                        "path": rel, "split": split, "label": label, "label_id": label_id,
                        "source_path": rel, "status": "ok", "error": "", "width": 32, "height": 32,
                        "mode": "L", "sha256": sha256_bytes(data), "phash": phash(pixels),
                        "mean": pixels.mean() / 255, "std": pixels.std() / 255,
                    }
                )
    write_manifest(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), root)
    return root


def write_synthetic(
    root: Path, prepared: Path, per_class: int = 30, copies: int = 0, seed: int = 1, blur: bool = False
) -> Path:
    """Fresh toy slices per class; the first `copies` of each class are byte copies of real train images."""
    rng = np.random.default_rng(seed)
    rows = []
    for label_id, label in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"{label}/{i:05d}.png"
            if i < copies:
                source = prepared / "train" / label / f"{label}_{i:03d}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(source.read_bytes())
            else:
                _save(toy_slice(rng, label, blur=blur), root / rel)
            rows.append({"path": rel, "label": label, "label_id": label_id, "seed": seed * 100_000 + i})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root
