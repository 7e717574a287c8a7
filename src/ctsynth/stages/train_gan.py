"""Stage `train_gan`: StyleGAN2-ADA on data/prepared/train (also under `torchrun --nproc_per_node N`).

Trains with params `gan` (a preset, then gan.overrides, then gan.kimg and gan.snap), resuming from
the newest snapshot in gan.out after an interruption, and writes gan.out/network-final.pt (or one
per class) and gan.report/{losses.png, ada_p.png, real_vs_synthetic.png, training_log.csv}. Logs to
MLflow (experiment ctsynth-gan, run `train_gan`; the report joins that run) and registers the
generator as a new version of `ctsynth-generator` (`models:/ctsynth-generator@latest`).

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
from ctsynth.config import Params
from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.distributed import init_from_environment
from ctsynth.gan.generate import find_networks, load_generator
from ctsynth.gan.presets import GANConfig, make_config
from ctsynth.gan.report import plot_ada, plot_losses, real_vs_synthetic_grid
from ctsynth.gan.train import QUALITY_LOG, TrainOptions, load_training_data, train_gan_models, world
from ctsynth.paths import resolve

log = logging.getLogger(__name__)

STAGE = "train_gan"


def gan_config(params: Params, gpus: int = 1) -> GANConfig:
    """The one place params become a GANConfig: gan.preset at the training resolution, then
    gan.overrides, then gan.kimg and gan.snap (which always win: they are their own params keys)."""
    gan = params.gan
    overrides = dict(gan.overrides) | {"kimg": gan.kimg, "snap": gan.snap}
    return make_config(gan.preset, training_resolution(params), gpus=gpus, **overrides)


def training_resolution(params: Params) -> int:
    return params.gan.resolution or params.data.resolution


def model_dirs(params: Params, out_dir: Path) -> list[Path]:
    """Where the networks live: gan.out for one conditional model, gan.out/<class> per class."""
    return [out_dir / name for name in params.data.classes] if params.gan.per_class else [out_dir]


def refuse_incompatible_state(folder: Path, cfg: GANConfig) -> None:
    """gan.out persists across `dvc repro` so a killed run resumes. Snapshots trained with
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


def write_reports(params: Params, cfg: GANConfig, data, out_dir: Path, report_dir: Path, root: Path, log_to_mlflow: bool = True) -> None:
    """The curves and the real-vs-synthetic grid; with MLflow, logged to the training run (whose id
    the final network records) and the generator registered (one conditional network only)."""
    gan, classes = params.gan, params.data.classes
    report_dir.mkdir(parents=True, exist_ok=True)
    generators = {name: (load_generator(path), index) for name, (path, index) in find_networks(out_dir, classes).items()}
    real_vs_synthetic_grid(data, generators, classes, report_dir / "real_vs_synthetic.png")
    training_log = pd.concat([
        pd.read_csv(d / "training_log.csv").assign(model="conditional" if not gan.per_class else d.name) for d in model_dirs(params, out_dir)
    ])
    training_log.to_csv(report_dir / "training_log.csv", index=False)
    plot_losses(training_log, report_dir / "losses.png")
    plot_ada(training_log, report_dir / "ada_p.png", target=cfg.ada_target)
    if log_to_mlflow:
        first_final = next(iter(generators.values()))[0].path
        run_id = torch.load(first_final, weights_only=True).get("mlflow_run_id") or None
        with tracking.start_run(tracking.EXPERIMENT_GAN, f"{STAGE}-report", resume_run_id=run_id, root=root) as run:
            import mlflow

            mlflow.log_artifacts(str(report_dir), artifact_path="report")
            tracking.log_lineage([params.data.prepared], context="training", root=root)
            if not gan.per_class:  # one network to register; per-class models stay files in gan.out
                from ctsynth.registry import register_generator

                quality_log = out_dir / QUALITY_LOG
                quality = pd.read_csv(quality_log).iloc[-1].to_dict() if quality_log.exists() else {}
                register_generator(first_final, report_dir / "real_vs_synthetic.png", quality, run_id=run.info.run_id)
    log.info("GAN report in %s", report_dir)


def run(params: Params, root: Path, device: str = "auto", resume: str | None = "auto", log_to_mlflow: bool = True) -> Path:
    """Train, then write the reports; returns gan.out. `device`, `resume` (auto: the newest snapshot
    in gan.out; None: start fresh; or a snapshot file) and `log_to_mlflow` are how to run, not what
    to learn, so they are not params keys (`ctsynth train-gan --device/--resume/--no-mlflow`)."""
    gan = params.gan
    classes = params.data.classes
    raw = [resolve(params.data.raw, root)]
    out_dir = ckpt.check_output_location(resolve(gan.out, root), root=root, protected=raw, allow_outside_repo=gan.allow_outside_repo)
    report_dir = ckpt.check_output_location(resolve(gan.report, root), root=root, protected=raw, allow_outside_repo=gan.allow_outside_repo)
    device, world_size = init_from_environment(device)
    rank, _ = world()
    if rank != 0:  # one process speaks; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    cfg = gan_config(params, gpus=world_size)
    for folder in model_dirs(params, out_dir):
        refuse_incompatible_state(folder, GANConfig.from_dict(cfg.to_dict() | {"c_dim": 0 if gan.per_class else len(classes)}))

    cfg, precision_tags = choose_training_precision(cfg, gan.precision, device)
    data = load_training_data(resolve(params.data.prepared, root), classes, training_resolution(params))
    options = TrainOptions(
        out_dir=out_dir, classes=classes, resume=resume, snap_keep=gan.snap_keep, tick_kimg=gan.tick_kimg,
        device=device, mlflow=log_to_mlflow, mlflow_tags={"stage": STAGE, "preset": gan.preset, **precision_tags},
        allow_tf32=gan.allow_tf32, init_from=resolve(gan.init_from, root) if gan.init_from else None, freeze_d=gan.freeze_d,
        snapshot_kid=gan.snapshot_kid, quality=params.synthetic,
    )
    train_gan_models(cfg, data, options, per_class=gan.per_class)
    try:
        if rank == 0:
            write_reports(params, cfg, data, out_dir, report_dir, root, log_to_mlflow)
    finally:  # the other ranks wait until rank 0's files are complete (or it failed)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return out_dir
