"""DVC stage `train_gan`: python pipelines/train_gan.py

Trains StyleGAN2-ADA (params.yaml `gan`) on data/prepared/train, resuming from the newest snapshot
in models/gan after an interruption, and writes models/gan/network-final.pt (or one per class) and
reports/gan/{losses.png, ada_p.png, real_vs_synthetic.png, training_log.csv}. Logs to MLflow
(experiment ctsynth-gan).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from ctsynth import tracking
from ctsynth.config import load_params
from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.distributed import init_from_environment
from ctsynth.gan.generate import find_networks, load_generator
from ctsynth.gan.presets import GANConfig, make_config
from ctsynth.gan.report import plot_ada, plot_losses, real_vs_synthetic_grid
from ctsynth.gan.train import TrainOptions, load_training_data, train_gan_models
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root

log = logging.getLogger("train_gan")


def discard_incompatible_state(folder: Path, cfg: GANConfig) -> None:
    """models/gan persists across `dvc repro` so a killed run resumes; a change of architecture
    or schedule (anything but kimg/snap) makes the old snapshots useless, so start over."""
    found = ckpt.newest_loadable_snapshot(folder) if folder.is_dir() else None
    if found is None:
        return
    saved = found[1]["config"]
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in ("kimg", "snap") and saved.get(k) != v)
    if changed:
        log.warning("GAN settings changed (%s): discarding the old snapshots in %s", changed, folder)
        shutil.rmtree(folder)


def main() -> None:
    setup_logging()
    params = load_params()
    root = repo_root()
    gan = params.gan
    classes = params.data.classes
    resolution = gan.resolution or params.data.resolution
    device, world_size = init_from_environment("auto")
    overrides = dict(gan.overrides) | {"kimg": gan.kimg, "snap": gan.snap}
    cfg = make_config(gan.preset, resolution, gpus=world_size, **overrides)
    out_dir, report_dir = root / gan.out, root / gan.report
    for folder in [out_dir] if not gan.per_class else [out_dir / c for c in classes]:
        conditional = GANConfig.from_dict(cfg.to_dict() | {"c_dim": 0 if gan.per_class else len(classes)})
        discard_incompatible_state(folder, conditional)

    data = load_training_data(root / params.data.prepared, classes, resolution)
    options = TrainOptions(
        out_dir=out_dir, classes=classes, resume="auto", snap_keep=gan.snap_keep, tick_kimg=gan.tick_kimg,
        device=device, mlflow_tags={"stage": "train_gan", "preset": gan.preset},
    )
    train_gan_models(cfg, data, options, per_class=gan.per_class)

    report_dir.mkdir(parents=True, exist_ok=True)
    logs = [out_dir / "training_log.csv"] if not gan.per_class else [out_dir / c / "training_log.csv" for c in classes]
    generators = {}
    for name, (path, index) in find_networks(out_dir, classes).items():
        generators[name] = (load_generator(path), index)
    real_vs_synthetic_grid(data, generators, classes, report_dir / "real_vs_synthetic.png")
    training_log = pd.concat(
        [pd.read_csv(p).assign(model="conditional" if not gan.per_class else p.parent.name) for p in logs]
    )
    training_log.to_csv(report_dir / "training_log.csv", index=False)
    plot_losses(training_log, report_dir / "losses.png")
    plot_ada(training_log, report_dir / "ada_p.png", target=cfg.ada_target)
    import torch

    first_final = next(iter(generators.values()))[0].path
    run_id = torch.load(first_final, weights_only=True).get("mlflow_run_id") or None
    with tracking.start_run(tracking.EXPERIMENT_GAN, "train_gan-report", resume_run_id=run_id):
        import mlflow

        mlflow.log_artifacts(str(report_dir), artifact_path="report")
    log.info("GAN report in %s", report_dir)


if __name__ == "__main__":
    main()
