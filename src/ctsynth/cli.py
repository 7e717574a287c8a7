"""`ctsynth` command line. Each command parses its arguments here and imports its library module
only when it runs, so `ctsynth --help` stays instant.

A command of a DVC stage (prepare, validate, train-gan, generate, validate-synthetic, oracle,
train-classifier, select, report) writes its options into the params object and runs the stage's
module in ctsynth.stages, exactly what `python pipelines/<stage>.py` runs: a command and its stage
cannot drift apart."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctsynth.logs import setup_logging

log = logging.getLogger("ctsynth")


def _phantom(args: argparse.Namespace) -> int:
    from ctsynth.data.phantom import write_phantom_dataset

    write_phantom_dataset(Path(args.out), seed=args.seed, workers=args.workers)
    return 0


def _path(value: str | None, root: Path) -> str | None:
    """A path given on the command line (relative to the working directory) as a params value:
    relative to the repository when inside it, as params.yaml writes paths, else absolute."""
    if value is None:
        return None
    path = Path(value).resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _run_stage(args: argparse.Namespace, name: str, overrides, **options) -> int:
    """Load --params, apply the command's options to it, and execute the DVC stage's own module:
    the command and `python pipelines/<stage>.py` run the same code on the same params.
    `overrides`: {section: {key: value}} (None values keep the params value), or a function of the
    loaded params giving that (for an option that adds to a params value)."""
    import importlib

    from ctsynth import stages
    from ctsynth.config import load_params, with_overrides
    from ctsynth.paths import repo_root

    params = load_params(args.params)
    params = with_overrides(params, **(overrides(params) if callable(overrides) else overrides))
    stage = importlib.import_module(f"ctsynth.stages.{name}")
    return stages.execute(stage, params, repo_root(), **options)


def _prepare(args: argparse.Namespace) -> int:
    from ctsynth.paths import repo_root

    root = repo_root()
    return _run_stage(args, "prepare", {"data": {"raw": _path(args.raw, root), "prepared": _path(args.out, root),
                                                 "resolution": args.resolution, "allow_outside_repo": args.allow_outside_repo or None}})


def _validate(args: argparse.Namespace) -> int:
    from ctsynth.paths import repo_root

    root = repo_root()
    return _run_stage(args, "validate", {"data": {"raw": _path(args.raw, root), "prepared": _path(args.prepared, root)},
                                         "validation": {"report": _path(args.report, root)}})


def _validate_synthetic(args: argparse.Namespace) -> int:
    from ctsynth.paths import repo_root

    root = repo_root()
    return _run_stage(args, "validate_synthetic",
                      {"data": {"prepared": _path(args.prepared, root)},
                       "synthetic": {"synthetic": _path(args.synthetic, root), "report": _path(args.report, root)}},
                      log_to_mlflow=not args.no_mlflow)


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
    from ctsynth.paths import repo_root

    root = repo_root()
    def overrides(params) -> dict[str, dict]:
        gan = {"out": _path(args.out, root), "report": _path(args.report, root), "preset": args.preset, "kimg": args.kimg,
               "snap": args.snap, "resolution": args.resolution, "per_class": args.per_class,
               # --set adds to gan.overrides; the stage's gan_config puts gan.kimg and gan.snap on top
               "overrides": dict(params.gan.overrides) | _parse_overrides(args.set),
               "init_from": _path(args.init_from, root), "freeze_d": args.freeze_d,
               "allow_tf32": args.allow_tf32 or None, "snapshot_kid": False if args.no_snapshot_kid else None,
               # the command writes where it is told (never into the raw data)
               "allow_outside_repo": True}
        return {"data": {"prepared": _path(args.data, root)}, "gan": gan}

    return _run_stage(args, "train_gan", overrides, device=args.device, resume=None if args.resume == "none" else args.resume,
                      log_to_mlflow=not args.no_mlflow)


def _generate(args: argparse.Namespace) -> int:
    from ctsynth.paths import repo_root
    from ctsynth.stages.generate import REGISTRY_SCHEME

    root = repo_root()
    network = args.network if args.network.startswith(REGISTRY_SCHEME) else _path(args.network, root)
    return _run_stage(
        args, "generate",
        {"gan": {"out": network},
         "generate": {"out": _path(args.out, root), "per_class": args.per_class, "seed": args.seed, "psi": args.psi,
                      "out_resolution": args.resolution, "noise_mode": args.noise_mode, "snapshot": args.snapshot,
                      "allow_outside_repo": True}},
    )


def _oracle(args: argparse.Namespace) -> int:
    return _run_stage(args, "oracle", {})


def _train_classifier(args: argparse.Namespace) -> int:
    from ctsynth.stages.train_classifier import UnknownItems

    try:
        return _run_stage(args, "train_classifier", {"sweep": {"executor": args.executor}}, items=args.item)
    except UnknownItems as exc:
        log.error("%s", exc)
        return 2


def _select(args: argparse.Namespace) -> int:
    return _run_stage(args, "select_champion", {})


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
    return _run_stage(args, "report", {}, out=args.out)


def _lineage(args: argparse.Namespace) -> int:
    import json

    from ctsynth import tracking
    from ctsynth.registry import ChampionNotFoundError, lineage, run_lineage

    tracking.configure()
    try:
        walk = run_lineage(args.run) if args.run else lineage(args.model, args.alias)
    except ChampionNotFoundError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(walk, indent=2))
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
    from ctsynth.config import EXECUTORS, GAN_PRESETS, GENERATE_SNAPSHOTS, NOISE_MODES

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
    p.add_argument("--report", default=None, help="folder for the curves and the real-vs-synthetic grid (default: params.yaml gan.report)")
    p.add_argument("--preset", default=None, choices=GAN_PRESETS, help="default: params.yaml gan.preset")
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
    p.add_argument("--snapshot", default=None, choices=GENERATE_SNAPSHOTS,
                   help="for a GAN folder: network-final.pt, or the snapshot with the lowest KID at training time")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, required=True)
    p.add_argument("--seed", type=int, default=None, help="default: params.yaml generate.seed")
    p.add_argument("--psi", type=float, default=None, help="truncation: 1 = none, 0 = the average image (default: generate.psi)")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize outputs to this size, e.g. 224 (default: generate.out_resolution, else data.resolution)")
    p.add_argument("--noise-mode", default=None, choices=NOISE_MODES, help="default: params.yaml generate.noise_mode")
    p.set_defaults(handler=_generate)


    p = commands.add_parser("train-classifier", aliases=["sweep"],
                            help="run the sweep's items (arms x ratios x seeds) through the executor; unchanged items are reused")
    p.add_argument("--item", nargs="+", default=None, help="only these items, e.g. synthetic_r0.5_s3 real_r0.0_s0 (default: all)")
    p.add_argument("--executor", choices=EXECUTORS, default=None, help="override sweep.executor")
    p.set_defaults(handler=_train_classifier)

    p = commands.add_parser("oracle", help="the oracle arm's new genuine images (sweep.oracle): new phantom slices or a held-out share")
    p.set_defaults(handler=_oracle)

    p = commands.add_parser("select", help="sweep statistics, champion by validation metric, ONNX export + parity, registry")
    p.set_defaults(handler=_select)

    p = commands.add_parser("predict", help="label + probabilities per image file as JSON lines (champion or --onnx)")
    p.add_argument("files", nargs="+", help="PNG, JPEG or DICOM files")
    p.add_argument("--onnx", default=None, help="an exported ONNX file instead of ctsynth-classifier@champion")
    p.set_defaults(handler=_predict)

    p = commands.add_parser("report", help="write the self-contained HTML study report (reports/summary.html)")
    p.add_argument("--out", default="reports/summary.html", help="HTML file to write (relative to the repository root)")
    p.set_defaults(handler=_report)

    p = commands.add_parser("lineage", help="walk back from the champion (or a run) to its data versions, commit and generator, as JSON")
    p.add_argument("--model", default="ctsynth-classifier", help="registered model name")
    p.add_argument("--alias", default="champion", help="the version's alias")
    p.add_argument("--run", default=None, help="a sweep item's MLflow run id instead of a registered model")
    p.set_defaults(handler=_lineage)

    p = commands.add_parser("summary", help="print the sweep table with CIs, the champion and where to look next")
    p.set_defaults(handler=_summary)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
