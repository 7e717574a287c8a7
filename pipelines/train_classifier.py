"""DVC stage `train_classifier`: python pipelines/train_classifier.py

Runs every item of the sweep (sweep.arms x sweep.ratios x sweep.seeds) through the executor that
params.yaml's `sweep.executor` names (local worker processes, or Ray tasks on $RAY_ADDRESS). Each
item mixes its training set, trains with early stopping on validation, measures on the real test
split, logs an MLflow child run under the sweep's parent run, and writes
metrics/sweep/<arm>_r<ratio>_s<seed>.json (flat numbers; details beside it in details/) and
models/classifier/runs/<arm>_r<ratio>_s<seed>.pt.
Items whose params, data and code did not change since their files were written are reused; an
item that fails twice is named in the error, and a rerun runs only the missing items.
"""

import argparse
import logging
import sys

from ctsynth.classifier.executor import SweepFailed, run_sweep
from ctsynth.config import load_params
from ctsynth.logs import setup_logging
from ctsynth.paths import repo_root

log = logging.getLogger("train_classifier")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None)
    args = parser.parse_args()
    setup_logging()
    try:
        run_sweep(load_params(args.params), repo_root())
    except SweepFailed as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
