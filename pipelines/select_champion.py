"""DVC stage `select`: python pipelines/select_champion.py (not select.py: that name would shadow the stdlib `select` module for every script in pipelines/)

Reads every metrics/sweep/r*_s*.json, writes reports/sweep.csv, metrics/summary.json (mean +- 95 %
CI per ratio and metric, paired differences against ratio 0) and plots/ratio_vs_metric.{png,csv};
picks the champion by VALIDATION metric, exports models/classifier/model.onnx (fails when
onnxruntime and PyTorch disagree by more than select.parity_tolerance on the validation images) and
registers it as ctsynth-classifier@champion in the MLflow Model Registry.
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
