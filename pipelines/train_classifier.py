"""DVC stage `train_classifier` (one matrix item): python pipelines/train_classifier.py --ratio R --seed S

Reads params.yaml (classifier, data, sweep), mixes round(R x n_real) synthetic images per class
into the training split, trains with early stopping on validation, measures on the real test split,
logs an MLflow child run under the sweep's parent run, and writes
metrics/sweep/r{R}_s{S}.json and models/classifier/runs/r{R}_s{S}.pt.
"""

import argparse

from ctsynth.classifier.sweep import run_sweep_item
from ctsynth.config import load_params
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The ratio is kept as written (e.g. "0.25"): it names the output files dvc.yaml declares.
    parser.add_argument("--ratio", required=True, help="synthetic images per real image and class, e.g. 0.25")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--params", default=None)
    args = parser.parse_args()
    setup_logging()
    run_sweep_item(load_params(args.params), float(args.ratio), args.seed, repo_root(), label=args.ratio)


if __name__ == "__main__":
    main()
