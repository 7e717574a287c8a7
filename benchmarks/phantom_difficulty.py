"""How hard is the embedded phantom? A small CNN on the prepared train split, valid/test accuracy.

The study only measures something if a classifier trained on the real-sized train split is
clearly below 100 % test accuracy; the phantom is tuned so that this probe lands at 0.70-0.90.

    python benchmarks/phantom_difficulty.py                      # uses data/prepared (dvc repro first)
    python benchmarks/phantom_difficulty.py --prepared DIR --epochs 40 --seeds 0 1 2

Fixed budget: the same epochs, batch size and learning rate for every seed; reports the mean
and the spread over seeds. Reads the PNGs through the one preprocessing path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctsynth.config import load_params
from ctsynth.data.manifest import read_manifest
from ctsynth.data.preprocess import preprocess_bytes


def load_split(prepared: Path, split: str, resolution: int, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = read_manifest(prepared)
    rows = manifest[(manifest["split"] == split) & (manifest["status"] == "ok") & manifest["label"].isin(classes)]
    images = np.stack([preprocess_bytes((prepared / p).read_bytes(), resolution) for p in rows["path"]])
    labels = np.array([classes.index(label) for label in rows["label"]])
    return torch.from_numpy(images), torch.from_numpy(labels)


def small_cnn(n_classes: int) -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, n_classes))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def train_once(seed: int, train: tuple, epochs: int, batch_size: int, lr: float, n_classes: int) -> nn.Module:
    torch.manual_seed(seed)
    images, labels = train
    model = small_cnn(n_classes)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            batch = images[index]
            # Left-right flips: the mass may sit at either hilum.
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model


def main() -> None:
    params = load_params()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path(params.data.prepared))
    parser.add_argument("--resolution", type=int, default=params.data.resolution)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    classes = list(params.data.classes)
    train = load_split(args.prepared, "train", args.resolution, classes)
    valid = load_split(args.prepared, "valid", args.resolution, classes)
    test = load_split(args.prepared, "test", args.resolution, classes)
    majority = float(max((test[1] == c).float().mean() for c in range(len(classes))))
    print(f"train {len(train[1])}  valid {len(valid[1])}  test {len(test[1])} images at {args.resolution} px; "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; test majority-class accuracy {majority:.3f}")
    print(f"{'seed':>4}  {'train_acc':>9}  {'valid_acc':>9}  {'test_acc':>8}  {'seconds':>7}")
    results = []
    for seed in args.seeds:
        started = time.perf_counter()
        model = train_once(seed, train, args.epochs, args.batch_size, args.lr, len(classes))
        row = (accuracy(model, *train), accuracy(model, *valid), accuracy(model, *test))
        results.append(row)
        print(f"{seed:>4}  {row[0]:>9.3f}  {row[1]:>9.3f}  {row[2]:>8.3f}  {time.perf_counter() - started:>7.1f}")
    table = np.array(results)
    print(f"mean  {table[:, 0].mean():>9.3f}  {table[:, 1].mean():>9.3f}  {table[:, 2].mean():>8.3f}")
    print(f"std   {table[:, 0].std():>9.3f}  {table[:, 1].std():>9.3f}  {table[:, 2].std():>8.3f}")


if __name__ == "__main__":
    main()
