"""DVC stage `train_gan`: python pipelines/train_gan.py   (or: torchrun --nproc_per_node N pipelines/train_gan.py)

Trains StyleGAN2-ADA (params.yaml `gan`) on data/prepared/train, resuming from the newest snapshot
in models/gan after an interruption, and writes models/gan/network-final.pt (or one per class) and
reports/gan/{losses.png, ada_p.png, real_vs_synthetic.png, training_log.csv}. Logs to MLflow
(experiment ctsynth-gan) and registers the generator as a new version of `ctsynth-generator`
(`models:/ctsynth-generator@latest`).

Never deletes a snapshot because a setting changed: snapshots of other settings make the stage
stop with the changed keys and how to start fresh. Under torchrun only rank 0 writes reports,
logs and the registry entry; the other ranks wait at a barrier.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from ctsynth import tracking
from ctsynth.config import load_params
from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.distributed import init_from_environment
from ctsynth.gan.generate import find_networks, load_generator
from ctsynth.gan.presets import GANConfig, make_config
from ctsynth.gan.report import plot_ada, plot_losses, real_vs_synthetic_grid
from ctsynth.gan.train import QUALITY_LOG, TrainOptions, load_training_data, train_gan_models, world
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root

log = logging.getLogger("train_gan")


def refuse_incompatible_state(folder: Path, cfg: GANConfig) -> None:
    """models/gan persists across `dvc repro` so a killed run resumes. Snapshots trained with
    other settings (the trainer's rule: anything but kimg, snap and speed-only keys) are never
    deleted here: the stage stops and says how to start fresh."""
    found = ckpt.newest_loadable_snapshot(folder) if folder.is_dir() else None
    if found is None:
        return
    changed = ckpt.incompatible_changes(found[1]["config"], cfg)
    if changed:
        raise SystemExit(
            f"{folder} holds snapshots trained with other settings for {changed} (newest: {found[0].name}). "
            "They are kept. To start fresh, move them aside (e.g. `mv models/gan models/gan-old`) or set "
            "gan.out to a new folder; to continue that run, restore its settings."
        )


def choose_training_precision(cfg: GANConfig, setting: str, device) -> tuple[GANConfig, dict[str, str]]:
    """gan.precision: fp32 as configured, or auto: measured fp32 vs bf16 on this machine (cached).
    Returns the config to train and MLflow tags holding the choice and both step times."""
    if setting != "auto":
        return cfg, {"precision": "fp32" if cfg.num_bf16_res == 0 else f"bf16 top {cfg.num_bf16_res} resolutions (overrides)"}
    if dist.is_initialized():  # the measurement runs single-process steps: not inside a process group
        log.warning("gan.precision auto is not measured under torchrun; training as configured (num_bf16_res %d)", cfg.num_bf16_res)
        return cfg, {"precision": "as configured (torchrun)"}
    from ctsynth.gan.precision import choose_precision

    choice = choose_precision(cfg, device=str(device))
    log.info("precision: %s", choice.reason)
    chosen = GANConfig.from_dict(cfg.to_dict() | {"num_bf16_res": choice.num_bf16_res})
    return chosen, {key: str(value) for key, value in choice.mlflow_params().items()}


def write_reports(params, cfg: GANConfig, data, out_dir: Path, report_dir: Path) -> None:
    gan, classes = params.gan, params.data.classes
    report_dir.mkdir(parents=True, exist_ok=True)
    model_dirs = [out_dir] if not gan.per_class else [out_dir / c for c in classes]
    generators = {name: (load_generator(path), index) for name, (path, index) in find_networks(out_dir, classes).items()}
    real_vs_synthetic_grid(data, generators, classes, report_dir / "real_vs_synthetic.png")
    training_log = pd.concat([
        pd.read_csv(d / "training_log.csv").assign(model="conditional" if not gan.per_class else d.name) for d in model_dirs
    ])
    training_log.to_csv(report_dir / "training_log.csv", index=False)
    plot_losses(training_log, report_dir / "losses.png")
    plot_ada(training_log, report_dir / "ada_p.png", target=cfg.ada_target)
    first_final = next(iter(generators.values()))[0].path
    run_id = torch.load(first_final, weights_only=True).get("mlflow_run_id") or None
    with tracking.start_run(tracking.EXPERIMENT_GAN, "train_gan-report", resume_run_id=run_id) as run:
        import mlflow

        mlflow.log_artifacts(str(report_dir), artifact_path="report")
        tracking.log_lineage([params.data.prepared], context="training")
        if not gan.per_class:  # one network to register; per-class models stay files in models/gan
            from ctsynth.registry import register_generator

            quality_log = out_dir / QUALITY_LOG
            quality = pd.read_csv(quality_log).iloc[-1].to_dict() if quality_log.exists() else {}
            register_generator(first_final, report_dir / "real_vs_synthetic.png", quality, run_id=run.info.run_id)
    log.info("GAN report in %s", report_dir)


def main() -> None:
    setup_logging()
    params = load_params()
    root = repo_root()
    gan = params.gan
    classes = params.data.classes
    resolution = gan.resolution or params.data.resolution
    raw = [root / params.data.raw]
    out_dir = ckpt.check_output_location(root / gan.out, root=root, protected=raw, allow_outside_repo=gan.allow_outside_repo)
    report_dir = ckpt.check_output_location(root / gan.report, root=root, protected=raw, allow_outside_repo=gan.allow_outside_repo)
    device, world_size = init_from_environment("auto")
    rank, _ = world()
    if rank != 0:  # one process speaks; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    overrides = dict(gan.overrides) | {"kimg": gan.kimg, "snap": gan.snap}
    cfg = make_config(gan.preset, resolution, gpus=world_size, **overrides)
    for folder in [out_dir] if not gan.per_class else [out_dir / c for c in classes]:
        refuse_incompatible_state(folder, GANConfig.from_dict(cfg.to_dict() | {"c_dim": 0 if gan.per_class else len(classes)}))

    cfg, precision_tags = choose_training_precision(cfg, gan.precision, device)
    data = load_training_data(root / params.data.prepared, classes, resolution)
    options = TrainOptions(
        out_dir=out_dir, classes=classes, resume="auto", snap_keep=gan.snap_keep, tick_kimg=gan.tick_kimg,
        device=device, mlflow_tags={"stage": "train_gan", "preset": gan.preset, **precision_tags}, allow_tf32=gan.allow_tf32,
        init_from=root / gan.init_from if gan.init_from else None, freeze_d=gan.freeze_d,
        snapshot_kid=gan.snapshot_kid, quality=params.synthetic,
    )
    train_gan_models(cfg, data, options, per_class=gan.per_class)
    try:
        if rank == 0:
            write_reports(params, cfg, data, out_dir, report_dir)
    finally:  # the other ranks wait until rank 0's files are complete (or it failed)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
