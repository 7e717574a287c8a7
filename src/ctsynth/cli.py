"""`ctsynth` command line. Each command parses its arguments here and imports its library module
only when it runs, so `ctsynth --help` stays instant."""

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


def _prepare(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.data.ingest import prepare_dataset

    data_params = load_params(args.params).data.model_copy(update={"resolution": args.resolution})
    result = prepare_dataset(Path(args.raw), Path(args.out), data_params)
    return 0 if result.ok else 1


def _validate(args: argparse.Namespace) -> int:
    from ctsynth.config import load_params
    from ctsynth.validation.suite import validate_dataset

    params = load_params(args.params)
    result = validate_dataset(Path(args.raw), Path(args.prepared), Path(args.report), params.data, params.validation)
    return 0 if result.success else 1


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
    p.set_defaults(handler=_prepare)

    p = commands.add_parser("validate", help="Great Expectations checks of raw + prepared data (leakage, blanks, counts)")
    p.add_argument("--raw", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--report", required=True, help="folder for JSON results and GX Data Docs")
    p.set_defaults(handler=_validate)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
