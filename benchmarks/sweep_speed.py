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

`--compare executor` measures instead the default sweep (params.yaml's arms x ratios x seeds: 50 items
of the small CNN at 64 px on the embedded phantom) run two ways on the same data, one after the other in one run:
  sequential: one fresh `python` process per item, as the former one-DVC-stage-per-item matrix
              ran them (each pays torch/MLflow start-up and data loading; torch's default threads);
  local:      the local executor (ctsynth.classifier.executor.run_sweep): a pool of worker
              processes sized to the machine, each running many items.
A second phantom set (other seed) stands in for the synthetic images: an item's cost depends on
how many images it trains on, not on where they come from. The oracle arm's pool is built as the
`oracle` stage builds it.

    python benchmarks/sweep_speed.py --compare executor    # ~ 30 min on 2 idle CPU cores
    python benchmarks/sweep_speed.py --compare executor --seeds 0 1   # 20 of the 50 items
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ctsynth.classifier.train import train_classifier
from ctsynth.config import ClassifierParams
from ctsynth.data.mixing import mix_training_set, real_split, synthetic_pool
from ctsynth.device import cpu_model

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


# One sweep item in a fresh interpreter: what pipelines/train_classifier.py did per DVC matrix item.
SEQUENTIAL_ITEM = """
import sys
from pathlib import Path
from ctsynth.classifier.sweep import SweepItem, run_sweep_item
from ctsynth.config import load_params
from ctsynth.logs import setup_logging
setup_logging("WARNING")
arm, ratio, seed, params, root = sys.argv[1:]
run_sweep_item(load_params(params), SweepItem(arm, float(ratio), int(seed)), Path(root), progress=False)
"""


def compare_executor(workdir: Path, ratios: list[float], seeds: list[int]) -> None:
    """Wall time of the sweep (default: params.yaml's): one process per item vs the local executor,
    same data, one run."""
    import yaml

    from ctsynth.classifier.executor import local_pool_size, run_sweep
    from ctsynth.classifier.sweep import sweep_items
    from ctsynth.config import load_params
    from ctsynth.data.ingest import prepare_dataset
    from ctsynth.data.phantom import write_phantom_dataset
    from ctsynth.paths import repo_root

    defaults = load_params(repo_root() / "params.yaml")
    base = defaults.model_copy(update={"sweep": defaults.sweep.model_copy(update={"ratios": ratios, "seeds": seeds})})
    prepared, synthetic = workdir / "prepared", workdir / "synthetic-standin"
    for folder, seed in ((prepared, base.data.phantom_seed), (synthetic, base.data.phantom_seed + 1000)):
        if not (folder / "manifest.csv").exists():
            write_phantom_dataset(workdir / f"raw-{seed}", seed=seed, workers=2)
            prepare_dataset(workdir / f"raw-{seed}", folder, base.data)
    oracle = workdir / "oracle"
    if not (oracle / "manifest.csv").exists():  # the oracle arm's new genuine images, as the `oracle` stage writes them
        from ctsynth.data.oracle import build_oracle

        build_oracle(base.model_copy(update={
            "data": base.data.model_copy(update={"prepared": str(prepared)}),
            "sweep": base.sweep.model_copy(update={"oracle": str(oracle)}),
        }), workdir)
    items = sweep_items(base)
    timings = {}
    for way in ("sequential", "local"):
        root = workdir / way
        shutil.rmtree(root, ignore_errors=True)  # a cold start: no item reused from an earlier run
        root.mkdir()
        values = base.model_dump(mode="json", by_alias=True)
        values["data"]["prepared"] = str(prepared)
        values["sweep"].update(synthetic=str(synthetic), oracle=str(oracle), metrics_dir=str(root / "metrics"), runs_dir=str(root / "runs"))
        params_file = root / "params.yaml"
        params_file.write_text(yaml.safe_dump(values, sort_keys=False))
        params = load_params(params_file)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        if way == "sequential":
            for item in items:
                subprocess.run([sys.executable, "-c", SEQUENTIAL_ITEM, item.arm, str(item.ratio), str(item.seed), str(params_file), str(root)],
                               check=True)
        else:
            outcome = run_sweep(params, root, progress=False)
            assert len(outcome.ran) == len(items), outcome
        timings[way] = time.perf_counter() - started
        print(f"  {way:10s}: {timings[way]:7.1f} s  (load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f})", flush=True)
    print(f"sweep of {len(items)} items (ratios {ratios}, seeds {seeds}) ({base.classifier.backbone}, {base.classifier.resolution} px, <= {base.classifier.epochs} epochs), "
          f"{len(os.sched_getaffinity(0))} usable cores, {cpu_model()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"  local executor: {local_pool_size(base, len(items))} workers x {base.sweep.threads_per_item} thread(s)")
    print(f"  sequential processes: {timings['sequential']:7.1f} s")
    print(f"  local executor:       {timings['local']:7.1f} s")
    print(f"  speed-up: {timings['sequential'] / timings['local']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=["cache", "executor"], default="cache",
                        help="cache: frozen-feature cache vs none (default); executor: local executor vs one process per item")
    parser.add_argument("--workdir", default=None, help="executor: keep data and results here (default: a temporary folder)")
    parser.add_argument("--weights", default="random-file", help="random-file (default), none, imagenet, or a file")
    # cache: 5 ratios x 5 seeds (the cache pays once, the uncached sweep per run);
    # executor: params.yaml's sweep (its arms, ratios and seeds), as `dvc repro` runs it
    parser.add_argument("--ratios", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--train", type=int, default=16, help="real training images (half per class)")
    parser.add_argument("--eval", type=int, default=4, help="validation and test images each")
    parser.add_argument("--prepared", default=None, help="use this prepared folder instead of generated images")
    parser.add_argument("--synthetic", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.compare == "executor":
        from ctsynth.config import load_params
        from ctsynth.paths import repo_root

        sweep = load_params(repo_root() / "params.yaml").sweep
        args.ratios, args.seeds = args.ratios or list(sweep.ratios), args.seeds or list(sweep.seeds)
        if args.workdir:
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            compare_executor(Path(args.workdir), args.ratios, args.seeds)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                compare_executor(Path(tmp), args.ratios, args.seeds)
        return
    args.ratios, args.seeds = args.ratios or [0.0, 0.25, 0.5, 0.75, 1.0], args.seeds or [0, 1, 2, 3, 4]
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
