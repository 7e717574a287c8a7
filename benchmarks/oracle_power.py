"""The positive control on the embedded data: does adding NEW genuine images (oracle) beat adding
duplicates at the largest ratio, by the study's own statistics? Also times one item per arm.

    python benchmarks/oracle_power.py --work WORKDIR [--seeds 5] [--ratio 1.0]

Writes the phantom data set (data.phantom_seed) and the oracle pool (sweep.oracle_seed) into
--work through the same prepare path as the pipeline, trains the default classifier (params.yaml)
for `real` (ratio 0), `duplicate` and `oracle` at --ratio for each seed (no MLflow: only the
training and the statistics), and prints the paired two-level bootstrap comparison, Holm-free
(one comparison), its MDE, and the seconds per item with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ctsynth.classifier.stats import mean_bootstrap, minimum_detectable_effect, paired_bootstrap
from ctsynth.classifier.train import train_classifier
from ctsynth.config import load_params
from ctsynth.data.ingest import prepare_dataset
from ctsynth.data.mixing import load_arm_data, real_split, training_set
from ctsynth.data.oracle import build_oracle
from ctsynth.data.phantom import write_phantom_dataset
from ctsynth.device import cpu_model
from ctsynth.logs import setup_logging

log = logging.getLogger("oracle_power")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    setup_logging()
    params = load_params()
    work = args.work
    params = params.model_copy(update={
        "data": params.data.model_copy(update={"raw": str(work / "raw"), "prepared": str(work / "prepared")}),
        "sweep": params.sweep.model_copy(update={"oracle": str(work / "oracle"), "ratios": [0.0, args.ratio]}),
    })
    classes = params.data.classes
    if not (work / "prepared" / "manifest.csv").is_file():
        write_phantom_dataset(work / "raw", seed=params.data.phantom_seed, workers=args.workers)
        prepare_dataset(work / "raw", work / "prepared", params.data)
    if not (work / "oracle" / "manifest.csv").is_file():
        build_oracle(params, work, workers=args.workers)
    prepared = work / "prepared"
    valid, test = real_split(prepared, "valid", classes), real_split(prepared, "test", classes)
    predictions: dict[str, dict[int, object]] = {}
    seconds: dict[str, list[float]] = {}
    labels = None
    for arm, ratio in (("real", 0.0), ("duplicate", args.ratio), ("oracle", args.ratio)):
        real_train, pools = load_arm_data(arm, prepared, work / "synthetic", work / "oracle", classes)
        for seed in range(args.seeds):
            items = training_set(arm, real_train, pools, ratio, seed, classes, params.sweep.classic_augmentation)
            started = time.perf_counter()
            result = train_classifier(params.classifier, items, valid, test, classes, seed, progress=False)
            seconds.setdefault(arm, []).append(time.perf_counter() - started)
            predictions.setdefault(arm, {})[seed] = result.test_probabilities
            labels = result.test_labels
            log.info("%s r%g s%d: %d images, test balanced accuracy %.3f, %.1f s", arm, ratio, seed, len(items),
                     result.test["balanced_accuracy"], seconds[arm][-1])
    select = params.select
    metric = select.compare_metric
    comparison = paired_bootstrap(metric, labels, predictions["oracle"], predictions["duplicate"], classes, select.bootstrap,
                                  select.confidence, select.bootstrap_seed)
    out = {
        "cpu": cpu_model(),
        "seeds": args.seeds,
        "ratio": args.ratio,
        "metric": metric,
        "n_test": int(len(labels)),
        **{arm: mean_bootstrap(metric, labels, per_seed, classes, select.bootstrap, select.confidence).as_dict() for arm, per_seed in predictions.items()},
        "oracle_minus_duplicate": comparison.as_dict(),
        "mde_single_comparison": minimum_detectable_effect(comparison.std_error, select.alpha, 1, select.power),
        "mde_family_of_8": minimum_detectable_effect(comparison.std_error, select.alpha, 8, select.power),
        "seconds_per_item": {arm: sum(v) / len(v) for arm, v in seconds.items()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
