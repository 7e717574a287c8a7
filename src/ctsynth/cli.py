"""`ctsynth` command line. Each command parses its arguments here and imports its library module
only when it runs, so `ctsynth --help` stays instant."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from ctsynth.logs import setup_logging

log = logging.getLogger("ctsynth")


def _phantom(args: argparse.Namespace) -> int:
    from ctsynth.data.phantom import write_phantom_dataset

    write_phantom_dataset(Path(args.out), seed=args.seed, workers=args.workers)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.data.ingest import prepare_dataset

    from ctsynth.paths import repo_root

    data_params = load_params(args.params).data.model_copy(update={"resolution": args.resolution})
    repository = None if args.allow_outside_repo else repo_root()
    result = prepare_dataset(Path(args.raw), Path(args.out), data_params, repository=repository)
    return 0 if result.ok else 1


def _validate(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.validation.suite import validate_dataset

    params = load_params(args.params)
    result = validate_dataset(Path(args.raw), Path(args.prepared), Path(args.report), params.data, params.validation)
    return 0 if result.success else 1


def _validate_synthetic(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.metrics.synthetic import validate_synthetic

    params = load_params(args.params)
    result = validate_synthetic(
        Path(args.synthetic), Path(args.prepared), Path(args.report), params.data, params.synthetic,
        validate_params=params.validation, log_to_mlflow=not args.no_mlflow,
    )
    return 0 if result.success else 1


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs; values are parsed as YAML so numbers, booleans and null work."""
    import yaml

    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _train_gan(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.gan.distributed import init_from_environment
    from ctsynth.gan.presets import make_config
    from ctsynth.gan.train import TrainOptions, load_training_data, train_gan_models

    params = load_params(args.params)
    gan = params.gan
    resolution = args.resolution or gan.resolution or params.data.resolution
    device, world_size = init_from_environment(args.device)
    overrides = dict(gan.overrides) | _parse_overrides(args.set)
    overrides["kimg"] = args.kimg if args.kimg is not None else gan.kimg
    overrides["snap"] = args.snap if args.snap is not None else gan.snap
    cfg = make_config(args.preset or gan.preset, resolution, gpus=world_size, **overrides)
    data = load_training_data(Path(args.data), params.data.classes, resolution)
    options = TrainOptions(
        out_dir=Path(args.out), classes=params.data.classes,
        resume=None if args.resume == "none" else args.resume, snap_keep=gan.snap_keep,
        tick_kimg=gan.tick_kimg, device=device, mlflow=not args.no_mlflow,
        allow_tf32=args.allow_tf32 or gan.allow_tf32,
        init_from=Path(args.init_from) if args.init_from else (Path(gan.init_from) if gan.init_from else None),
        freeze_d=args.freeze_d if args.freeze_d is not None else gan.freeze_d,
        snapshot_kid=gan.snapshot_kid and not args.no_snapshot_kid, quality=params.synthetic,
    )
    per_class = args.per_class if args.per_class is not None else gan.per_class
    train_gan_models(cfg, data, options, per_class=per_class)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.gan.generate import generate_images

    params = load_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        network = Path(args.network)
        if args.network.startswith("models:/"):
            from ctsynth.registry import download_generator

            network = download_generator(args.network, Path(tmp))
        generate_images(
            network, Path(args.out), params.data.classes, per_class=args.per_class, seed=args.seed,
            psi=args.psi, out_resolution=args.resolution, noise_mode=args.noise_mode, snapshot=args.snapshot,
        )
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from ctsynth.classifier.executor import SweepFailed, run_sweep
    from ctsynth.classifier.sweep import sweep_items
    from ctsynth.config import load_params
    from ctsynth.paths import repo_root

    params = load_params(args.params)
    if args.executor:
        params = params.model_copy(update={"sweep": params.sweep.model_copy(update={"executor": args.executor})})
    items = sweep_items(params)
    if args.item:
        unknown = sorted(set(args.item) - {item.name for item in items})
        if unknown:
            log.error("not items of this sweep: %s (known: %s)", ", ".join(unknown), ", ".join(i.name for i in items))
            return 2
        items = [item for item in items if item.name in args.item]
    try:
        run_sweep(params, repo_root(), items)
    except SweepFailed as exc:
        log.error("%s", exc)
        return 1
    return 0


def _select(args: argparse.Namespace) -> int:
    from ctsynth.classifier.selection import run_select
    from ctsynth.config import load_params
    from ctsynth.paths import repo_root

    run_select(load_params(args.params), repo_root())
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from ctsynth.classifier.predict import predict_files
    from ctsynth.registry import load_champion, load_onnx_file

    model = load_onnx_file(args.onnx) if args.onnx else load_champion()
    answers = predict_files([Path(f) for f in args.files], model)
    for answer in answers:
        print(json.dumps(answer))
    return 1 if any("error" in a for a in answers) else 0


def _report(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.paths import repo_root
    from ctsynth.report import write_report

    root = repo_root()
    try:
        write_report(load_params(args.params), root, root / args.out)
    except FileNotFoundError as exc:  # a stage output is missing: say which, no traceback
        log.error("%s", exc)
        return 1
    return 0


def _summary(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.paths import repo_root
    from ctsynth.report import study_summary_text

    try:
        print(study_summary_text(load_params(args.params), repo_root()))
    except FileNotFoundError as exc:  # no sweep yet: say what to run, no traceback
        log.error("%s", exc)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctsynth",
        description="StyleGAN2-ADA synthetic chest-CT data and the classifier study that measures it.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    parser.add_argument("--params", default=None, help="params.yaml to read (default: the repository's)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("phantom", help="write the embedded chest-CT phantom data set in the Kaggle layout")
    p.add_argument("--out", required=True, help="folder to write train/valid/test into")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    p.add_argument("--workers", type=int, default=2, help="processes used to simulate the CT acquisition")
    p.set_defaults(handler=_phantom)

    p = commands.add_parser("prepare", help="decode, map classes, pad/resize raw images; write PNGs + manifest.csv")
    p.add_argument("--raw", required=True, help="raw data in the Kaggle layout (split/class folder/files)")
    p.add_argument("--out", required=True, help="output folder for split/class/*.png and manifest.csv")
    p.add_argument("--resolution", type=int, required=True, help="output side length in pixels")
    p.add_argument("--allow-outside-repo", action="store_true",
                   help="allow an output folder outside the repository (it is never allowed inside the raw data)")
    p.set_defaults(handler=_prepare)

    p = commands.add_parser("validate", help="Great Expectations checks of raw + prepared data (leakage, blanks, counts)")
    p.add_argument("--raw", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--report", required=True, help="folder for JSON results and GX Data Docs")
    p.set_defaults(handler=_validate)

    p = commands.add_parser(
        "validate-synthetic",
        help="validate suite on the synthetic manifest + KID, Fréchet distance, precision/recall, memorisation",
    )
    p.add_argument("--synthetic", required=True, help="folder with manifest.csv and {class}/*.png from `generate`")
    p.add_argument("--prepared", required=True, help="prepared real data (manifest.csv, train/valid splits)")
    p.add_argument("--report", required=True, help="folder for metrics.json, details.json and nearest_neighbours.png")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.set_defaults(handler=_validate_synthetic)

    p = commands.add_parser("train-gan", help="train StyleGAN2-ADA on the prepared train split (resumable)")
    p.add_argument("--data", required=True, help="prepared data folder (train/<class>/*.png)")
    p.add_argument("--out", required=True, help="folder for snapshots, grids and network-final.pt")
    p.add_argument("--preset", default=None, help="auto, stylegan2, paper256, cifar, cpu64, tiny (default: params.yaml)")
    p.add_argument("--kimg", type=float, default=None, help="training length in thousands of real images")
    p.add_argument("--snap", type=float, default=None, help="kimg between snapshots")
    p.add_argument("--resolution", type=int, default=None, help="default: gan.resolution or data.resolution")
    p.add_argument("--per-class", dest="per_class", action="store_true", default=None,
                   help="one unconditional model per class (the reference study's way)")
    p.add_argument("--conditional", dest="per_class", action="store_false", help="one class-conditional model")
    p.add_argument("--resume", default="auto", help="auto (newest snapshot in --out), none, or a snapshot path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any GANConfig field")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="transfer: start from another run's snapshot-*.pt (weights only; kimg and p start at 0)")
    p.add_argument("--freeze-d", type=int, default=None, metavar="K",
                   help="Freeze-D: keep the first K (highest-resolution) discriminator blocks fixed")
    p.add_argument("--allow-tf32", action="store_true", help="TF32 on Ampere+ GPUs (off by default)")
    p.add_argument("--no-snapshot-kid", action="store_true", help="skip the KID at every snapshot")
    p.set_defaults(handler=_train_gan)

    p = commands.add_parser("generate", help="write N synthetic PNGs per class + manifest.csv from a trained GAN")
    p.add_argument("--network", required=True,
                   help="GAN folder (network-final.pt, or <class>/network-final.pt), a network file, "
                        "or a registry URI such as models:/ctsynth-generator@latest")
    p.add_argument("--snapshot", default="final", choices=["final", "best"],
                   help="for a GAN folder: network-final.pt, or the snapshot with the lowest KID at training time")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--psi", type=float, default=1.0, help="truncation: 1 = none, 0 = the average image")
    p.add_argument("--resolution", type=int, default=None, help="resize outputs to this size (e.g. 224)")
    p.add_argument("--noise-mode", default="const", choices=["const", "random", "none"])
    p.set_defaults(handler=_generate)


    p = commands.add_parser("train-classifier", aliases=["sweep"],
                            help="run the sweep's items (arms x ratios x seeds) through the executor; unchanged items are reused")
    p.add_argument("--item", nargs="+", default=None, help="only these items, e.g. synthetic_r0.5_s3 real_r0.0_s0 (default: all)")
    p.add_argument("--executor", choices=["local", "ray"], default=None, help="override sweep.executor")
    p.set_defaults(handler=_train_classifier)

    p = commands.add_parser("select", help="sweep statistics, champion by validation metric, ONNX export + parity, registry")
    p.set_defaults(handler=_select)

    p = commands.add_parser("predict", help="label + probabilities per image file as JSON lines (champion or --onnx)")
    p.add_argument("files", nargs="+", help="PNG, JPEG or DICOM files")
    p.add_argument("--onnx", default=None, help="an exported ONNX file instead of ctsynth-classifier@champion")
    p.set_defaults(handler=_predict)

    p = commands.add_parser("report", help="write the self-contained HTML study report (reports/summary.html)")
    p.add_argument("--out", default="reports/summary.html", help="HTML file to write (relative to the repository root)")
    p.set_defaults(handler=_report)

    p = commands.add_parser("summary", help="print the sweep table with CIs, the champion and where to look next")
    p.set_defaults(handler=_summary)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
