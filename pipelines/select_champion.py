"""DVC stage `select`: python pipelines/select_champion.py (not select.py: that name would shadow the stdlib `select` module for every script in pipelines/)

Reads the items of the current sweep matrix (metrics/sweep/<item>.json + details/; any other file is
ignored with a warning), writes reports/sweep.csv, reports/study.json (per arm and ratio: mean and
two-level bootstrap CI; the paired comparisons with Holm-corrected p, MDE and a verdict; GAN-test;
train-synthetic-test-real), metrics/summary.json (a dozen flat numbers for `dvc metrics`) and the
arms and class-signal plots; picks the champion by VALIDATION metric over every arm, exports
models/classifier/model.onnx (fails when onnxruntime and PyTorch disagree by more than
select.parity_tolerance on the validation images), registers it as a new version of
ctsynth-classifier, and moves @champion only when it beats the current champion on the same
validation images (select.promote: better | always). docs/study.md explains the statistics.
"""

import argparse

from ctsynth.classifier.selection import run_select
from ctsynth.config import load_params
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None)
    args = parser.parse_args()
    setup_logging()
    run_select(load_params(args.params), repo_root())


if __name__ == "__main__":
    main()
