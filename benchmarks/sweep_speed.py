"""Sweep wall time with and without the frozen-feature cache, measured in one run, as a ratio.

The reference-study classifier (ResNet50 frozen, reference head, 224 px, batch 20, Adam 0.005,
5 epochs) trains `--ratios x --seeds` sweep items twice on the same images:
  uncached: the frozen backbone runs on every image in every epoch (and for every evaluation);
  cached:   features are computed once per image (FeatureCache) and every item trains its head on them.
ImageNet weights are not on this offline machine, so by default (`--weights random-file`) one
random ResNet50 is written to a weights file first and every run loads it, as every run of the
reference study loads the same ImageNet file: the speed-up depends on the work done, not on the
weight values. (`--weights none` gives each seed its own random backbone, so each seed fills its
own cache entries.)

    python benchmarks/sweep_speed.py                       # 25 runs; ~ a few minutes on 2 CPU cores
    python benchmarks/sweep_speed.py --prepared data/prepared --synthetic data/synthetic --train 300
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ctsynth.classifier.train import train_classifier
from ctsynth.config import ClassifierParams
from ctsynth.data.mixing import mix_training_set, real_split, synthetic_pool

CLASSES = ["normal", "squamous"]


def write_images(folder: Path, counts: dict[str, int], split: str | None, seed: int) -> list[dict]:
    """64-px grey images (noise; `squamous` with a bright disc) in the pipeline's layouts."""
    rng = np.random.default_rng(seed)
    rows = []
    for label_id, label in enumerate(CLASSES):
        for i in range(counts[label]):
            pixels = rng.normal(90, 25, (64, 64))
            if label_id:
                yy, xx = np.mgrid[:64, :64]
                cy, cx = rng.integers(20, 44, 2)
                pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] += 110
            relative = f"{split + '/' if split else ''}{label}/{i:04d}.png"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(folder / relative)
            rows.append({"path": relative, "split": split, "label": label, "label_id": label_id, "status": "ok", "seed": i})
    return rows


def make_data(root: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    prepared, synthetic = root / "prepared", root / "synthetic"
    rows = []
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        rows += write_images(prepared, {c: n // 2 for c in CLASSES}, split, seed=len(rows))
    pd.DataFrame(rows).to_csv(prepared / "manifest.csv", index=False)
    pd.DataFrame(write_images(synthetic, {c: n_train // 2 for c in CLASSES}, None, seed=99)).drop(columns=["split"]).to_csv(synthetic / "manifest.csv", index=False)
    return prepared, synthetic


def run_sweep(params: ClassifierParams, prepared: Path, synthetic: Path, ratios, seeds, cached: bool) -> float:
    real_train = real_split(prepared, "train", CLASSES)
    valid, test = real_split(prepared, "valid", CLASSES), real_split(prepared, "test", CLASSES)
    pool = synthetic_pool(synthetic, CLASSES)
    started = time.perf_counter()
    for ratio in ratios:
        for seed in seeds:
            train = mix_training_set(real_train, pool, ratio, seed, CLASSES)
            train_classifier(params, train, valid, test, CLASSES, seed, progress=False, use_feature_cache=cached)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="random-file", help="random-file (default), none, imagenet, or a file")
    # The default sweep's shape (5 ratios x 5 seeds): the cache pays once, the uncached sweep per run.
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--train", type=int, default=16, help="real training images (half per class)")
    parser.add_argument("--eval", type=int, default=4, help="validation and test images each")
    parser.add_argument("--prepared", default=None, help="use this prepared folder instead of generated images")
    parser.add_argument("--synthetic", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.prepared:
            prepared, synthetic = Path(args.prepared), Path(args.synthetic)
        else:
            prepared, synthetic = make_data(root, args.train, args.eval)
        weights = args.weights
        if weights == "random-file":
            import torch
            from torchvision import models

            torch.manual_seed(0)
            weights = str(root / "resnet50-random.pth")
            torch.save(models.resnet50(weights=None).state_dict(), weights)
        params = ClassifierParams(
            backbone="resnet50", weights=weights, freeze_backbone=True, head="reference", resolution=224,
            batch_size=20, learning_rate=0.005, weight_decay=0.0, epochs=5, patience=5, augment=False,
            feature_cache=str(root / "features"),
        )
        runs = len(args.ratios) * len(args.seeds)
        uncached = run_sweep(params, prepared, synthetic, args.ratios, args.seeds, cached=False)
        print(f"  without feature cache: {uncached:8.1f} s (measured first)", flush=True)
        cached = run_sweep(params, prepared, synthetic, args.ratios, args.seeds, cached=True)
    print(f"sweep of {runs} runs, ResNet50 frozen (weights {args.weights}) at 224 px, 5 epochs:")
    print(f"  without feature cache: {uncached:8.1f} s")
    print(f"  with feature cache:    {cached:8.1f} s (features computed once per image, cold cache)")
    print(f"  speed-up: {uncached / cached:.1f}x")


if __name__ == "__main__":
    main()
