"""The `select` stage's computations: the study's table, statistics, verdicts, plots, and the champion
(ctsynth.stages.select_champion reads the sweep's files, exports, registers and logs).

Only the items of the current matrix (sweep.arms x sweep.ratios x sweep.seeds, ctsynth.classifier.
sweep.sweep_items) are read; any other metrics/sweep/*.json (a removed ratio, a manual run) is
ignored with a warning, never averaged in. Every item of the matrix must be there.

The champion is chosen on VALIDATION only, over every item of every arm: first the (arm, ratio)
with the best mean validation `select.metric` over its seeds, then, within it, the run with the
best validation metric (ties: validation `select.tie_breaker`, then lower validation loss, then
the lower seed). Test metrics are reported, never used to choose. It becomes @champion only when it
beats the current champion on the same validation images (`select.promote: better`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ctsynth.paths import resolve
from ctsynth.classifier.evaluate import METRIC_NAMES, read_item_details
from ctsynth.classifier.stats import (
    holm,
    mean_bootstrap,
    mean_ci,
    minimum_detectable_effect,
    paired_bootstrap,
)

log = logging.getLogger(__name__)

SPLITS = ("test", "valid")
BASELINE = "real"
# (arm, compared with) at every ratio > 0; "real" means the ratio-0 baseline. The family Holm corrects.
COMPARISONS = (("synthetic", "duplicate"), ("synthetic", "classic"), ("synthetic", BASELINE), ("oracle", "duplicate"))


def load_sweep_records(params, metrics_dir: Path) -> list[dict]:
    """The details record of every item of the current matrix; stale files are named and ignored."""
    from ctsynth.classifier.sweep import sweep_items

    items = sweep_items(params)
    expected = {item.name for item in items}
    stale = sorted(p.name for p in Path(metrics_dir).glob("*.json") if p.stem not in expected)
    if stale:
        log.warning("ignoring %d metrics file(s) in %s that are not items of the current sweep matrix: %s",
                    len(stale), metrics_dir, ", ".join(stale[:10]) + (" ..." if len(stale) > 10 else ""))
    missing = [item.name for item in items if not (Path(metrics_dir) / f"{item.name}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} item(s) of the sweep matrix have no result in {metrics_dir}: "
                                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; run the train_classifier stage first")
    records = []
    for item in items:
        record = read_item_details(metrics_dir, item.name)
        record.setdefault("arm", item.arm)
        if (record["arm"], float(record["ratio"]), int(record["seed"])) != (item.arm, item.ratio, item.seed):
            raise ValueError(f"{item.name}: its details file says arm {record['arm']}, ratio {record['ratio']}, seed {record['seed']}")
        record["name"] = item.name
        records.append(record)
    return records


def _number(value) -> float:
    return math.nan if value is None else float(value)


def sweep_table(records: list[dict]) -> pd.DataFrame:
    """One row per item (arm, ratio, seed): validation and test metrics, epochs, where the weights are."""
    rows = []
    for record in records:
        row = {"arm": record.get("arm", BASELINE if float(record["ratio"]) == 0 else "synthetic"), "ratio": float(record["ratio"]),
               "seed": int(record["seed"]), "name": record.get("name", "")}
        for split in SPLITS:
            for metric in (*METRIC_NAMES, "loss"):
                row[f"{split}_{metric}"] = _number(record[split].get(metric))
        row.update(
            best_epoch=record.get("best_epoch"),
            epochs_run=record.get("epochs_run"),
            n_train=sum(sum(c.values()) for c in record.get("train_counts", {}).values()),
            state_dict=record.get("state_dict", ""),
            run_id=record.get("mlflow", {}).get("run_id", ""),
            parent_run_id=record.get("mlflow", {}).get("parent_run_id", ""),
        )
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["ratio", "arm", "seed"], kind="stable").reset_index(drop=True)
    duplicated = table[table.duplicated(["arm", "ratio", "seed"], keep=False)]
    if len(duplicated):
        raise ValueError(f"sweep results hold (arm, ratio, seed) more than once: {duplicated[['arm', 'ratio', 'seed']].values.tolist()}")
    return table


def _test_predictions(records: list[dict]) -> tuple[np.ndarray, dict[tuple[str, float], dict[int, np.ndarray]]]:
    """(test labels, {(arm, ratio): {seed: probabilities}}); every item must share one test split."""
    labels = None
    arms: dict[tuple[str, float], dict[int, np.ndarray]] = {}
    for record in records:
        predictions = record.get("test_predictions")
        if not predictions:
            raise ValueError(f"{record.get('name')}: no test_predictions in its details file (written by an older train_classifier); rerun it")
        y = np.asarray(predictions["labels"], dtype=np.int64)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f"{record.get('name')}: its test labels differ from the other items'; all items must share one test split")
        arms.setdefault((record["arm"], float(record["ratio"])), {})[int(record["seed"])] = np.asarray(predictions["probabilities"])
    return labels, arms


def _pct(ratio: float) -> str:
    return f"{ratio:.0%}"


def verdict(arm: str, other: str, ratio: float, metric: str, comparison: dict, alpha: float) -> str:
    """'synthetic 50 % vs duplicate 50 %: +0.012 balanced accuracy [-0.030, 0.050], p 0.61 (Holm), not significant'."""
    other_name = "real only (ratio 0)" if other == BASELINE else f"{other} {_pct(ratio)}"
    head = f"{arm} {_pct(ratio)} vs {other_name}: "
    difference, low, high, p_holm = (comparison.get(k) for k in ("difference", "low", "high", "p_holm"))
    if difference is None or p_holm is None or math.isnan(difference) or math.isnan(p_holm):
        return head + "not testable (no paired seeds)"
    text = f"{difference:+.3f} {metric.replace('_', ' ')} [{low:+.3f}, {high:+.3f}], p {p_holm:.3g} after Holm correction"
    if p_holm < alpha:
        return head + text + f": significant, {arm} {'better' if difference > 0 else 'worse'}"
    return head + text + f": not significant (the design detects {comparison['mde']:.3f} with {comparison['power']:.0%} power)"


def study_statistics(records: list[dict], classes: list[str], select) -> dict:
    """Per (arm, ratio): mean [CI] of the compare metric (two-level bootstrap) and of every metric
    over seeds (t-interval); per comparison: paired two-level bootstrap, Holm, MDE, verdict."""
    metric, confidence, replicates, alpha = select.compare_metric, select.confidence, select.bootstrap, select.alpha
    labels, arms = _test_predictions(records)
    table = sweep_table(records)
    out: dict = {"metric": metric, "confidence": confidence, "replicates": replicates, "alpha": alpha, "power": select.power,
                 "n_items": len(records), "n_test": int(len(labels)), "arms": {}, "comparisons": []}
    for (arm, ratio), per_seed in sorted(arms.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows = table[(table["arm"] == arm) & np.isclose(table["ratio"], ratio)]
        entry = {"arm": arm, "ratio": ratio, "seeds": sorted(per_seed), "n_train": int(rows["n_train"].iloc[0]),
                 metric: mean_bootstrap(metric, labels, per_seed, classes, replicates, confidence, select.bootstrap_seed).as_dict()}
        for split in SPLITS:
            for name in METRIC_NAMES:
                entry[f"{split}_{name}"] = mean_ci(rows[f"{split}_{name}"].tolist(), confidence).as_dict()
        out["arms"][f"{arm}_r{ratio}"] = entry

    baseline = {s: p for (arm, _), per in arms.items() if arm == BASELINE for s, p in per.items()}
    ratios = sorted({ratio for (_, ratio) in arms if ratio > 0})
    family = []
    for ratio in ratios:
        for arm, other in COMPARISONS:
            a = arms.get((arm, ratio))
            b = baseline if other == BASELINE else arms.get((other, ratio))
            if a and b:
                result = paired_bootstrap(metric, labels, a, b, classes, replicates, confidence, select.bootstrap_seed)
                family.append({"arm": arm, "other": other, "ratio": ratio, **result.as_dict()})
    adjusted = holm([c["p_value"] for c in family])
    for comparison, p_holm in zip(family, adjusted):
        comparison["p_holm"] = p_holm
        comparison["power"] = select.power
        comparison["mde"] = minimum_detectable_effect(comparison["std_error"], alpha, len(family), select.power)
        comparison["significant"] = bool(not math.isnan(p_holm) and p_holm < alpha)
        comparison["verdict"] = verdict(comparison["arm"], comparison["other"], comparison["ratio"], metric, comparison, alpha)
    out["comparisons"] = family
    out["verdicts"] = [c["verdict"] for c in family]
    if ("synthetic_only", 1.0) in arms:
        # train-synthetic-test-real, beside the real baseline it would equal if the images were perfect
        out["train_synthetic_test_real"] = {
            "synthetic_only": out["arms"]["synthetic_only_r1.0"][metric],
            "real": out["arms"].get("real_r0.0", {}).get(metric),
        }
    mdes = [c["mde"] for c in family if not math.isnan(c["mde"])]
    out["minimum_detectable_effect"] = float(np.median(mdes)) if mdes else math.nan
    return out


def gan_test(params, records: list[dict], root: Path, select) -> dict | None:
    """GAN-test: the ratio-0 real classifiers' accuracy on the synthetic images labelled with
    their conditioning class (mean over seeds, two-level bootstrap over seeds x synthetic images)."""
    import torch

    from ctsynth.classifier.train import build_classifier, predict_probabilities
    from ctsynth.data.mixing import ImageDataset, synthetic_pool

    synthetic_dir = resolve(params.sweep.synthetic, root)
    baseline = [r for r in records if r["arm"] == BASELINE]
    if not baseline or not (synthetic_dir / "manifest.csv").is_file():
        log.warning("GAN-test skipped: %s", "no ratio-0 items" if not baseline else f"no {synthetic_dir}/manifest.csv")
        return None
    classes = params.data.classes
    pool = synthetic_pool(synthetic_dir, classes)
    items = [item for c in classes for item in pool[c]]
    inputs = ImageDataset(items, params.classifier.resolution).inputs
    labels = np.array([item.label_id for item in items])
    per_seed = {}
    for record in baseline:
        model = build_classifier(params.classifier, len(classes), structure_only=True)
        state = Path(record["state_dict"])
        model.load_state_dict(torch.load(resolve(state, root), map_location="cpu", weights_only=True))
        model.eval()
        per_seed[int(record["seed"])] = predict_probabilities(model, inputs, "fp32").numpy()
    result = {"n_images": int(len(items))}
    for name in ("accuracy", "balanced_accuracy"):
        result[name] = mean_bootstrap(name, labels, per_seed, classes, select.bootstrap, select.confidence, select.bootstrap_seed).as_dict()
    return result


def choose_champion(table: pd.DataFrame, metric: str, tie_breaker: str) -> tuple[tuple[str, float], pd.Series, pd.DataFrame]:
    """((arm, ratio), best run's row, ranking of (arm, ratio) groups) by validation metrics only."""
    key, tie = f"valid_{metric}", f"valid_{tie_breaker}"
    ranking = (
        table.groupby(["arm", "ratio"])[[key, tie]].mean().reset_index()
        .sort_values([key, tie, "ratio", "arm"], ascending=[False, False, True, True], kind="stable", na_position="last")
    )
    best_arm, best_ratio = str(ranking.iloc[0]["arm"]), float(ranking.iloc[0]["ratio"])
    candidates = table[(table["arm"] == best_arm) & np.isclose(table["ratio"], best_ratio)].sort_values(
        [key, tie, "valid_loss", "seed"], ascending=[False, False, True, True], kind="stable", na_position="last"
    )
    best = candidates.iloc[0]
    log.info("champion: arm %s ratio %g (mean %s %.4f), seed %d (%s %.4f)", best_arm, best_ratio, key, ranking.iloc[0][key], best["seed"], key, best[key])
    return (best_arm, best_ratio), best, ranking


def plot_rows(statistics: dict) -> pd.DataFrame:
    """Long table arm, ratio, mean, low, high of the compare metric (the DVC plot data and the PNG's numbers)."""
    metric = statistics["metric"]
    rows = [{"arm": e["arm"], "ratio": e["ratio"], "mean": e[metric]["estimate"], "low": e[metric]["low"], "high": e[metric]["high"],
             "n_seeds": len(e["seeds"])} for e in statistics["arms"].values()]
    return pd.DataFrame(rows, columns=["arm", "ratio", "mean", "low", "high", "n_seeds"])


def plot_arms(table: pd.DataFrame, statistics: dict, path: Path) -> Path:
    """The study's main figure: test metric vs ratio, one line per arm (its ratio-0 point is the
    shared real baseline), mean over seeds with the two-level bootstrap CI; seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = statistics["metric"]
    data = plot_rows(statistics)
    base = data[data["arm"] == BASELINE]
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    arms = [a for a in ("synthetic", "duplicate", "classic", "oracle") if a in set(data["arm"])]
    for i, arm in enumerate(arms):
        rows = pd.concat([base, data[data["arm"] == arm]]).sort_values("ratio")
        offset = (i - (len(arms) - 1) / 2) * 0.012  # side by side, so the error bars do not hide each other
        axis.errorbar(rows["ratio"] + offset, rows["mean"], yerr=[rows["mean"] - rows["low"], rows["high"] - rows["mean"]],
                      fmt="o-", capsize=3, color=f"C{i}", label=arm)
        seeds = table[(table["arm"] == arm) | (table["arm"] == BASELINE)]
        axis.scatter(seeds["ratio"] + offset, seeds[f"test_{metric}"], s=8, color=f"C{i}", alpha=0.35)
    only = data[data["arm"] == "synthetic_only"]
    if len(only):
        row = only.iloc[0]
        axis.errorbar([row["ratio"] + 0.04], [row["mean"]], yerr=[[row["mean"] - row["low"]], [row["high"] - row["mean"]]],
                      fmt="s", capsize=3, color="grey", label="synthetic only (no real image)")
    axis.set_xlabel("added images / real images (per class)")
    axis.set_ylabel(f"test {metric.replace('_', ' ')}")
    axis.set_title(f"Arms vs ratio: mean over seeds, {statistics['confidence']:.0%} CI over seeds and {statistics['n_test']} test images", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_signal(statistics: dict, gan: dict | None, path: Path) -> Path:
    """Do the synthetic images carry the class signal? GAN-test (real classifier on synthetic
    images) and train-synthetic-test-real beside the real baseline, with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = statistics["metric"]
    bars = []
    real = statistics["arms"].get("real_r0.0", {}).get(metric)
    if real:
        bars.append(("real -> real\n(baseline)", real))
    if gan:
        bars.append(("GAN-test\nreal -> synthetic", gan[metric]))
    tstr = statistics.get("train_synthetic_test_real")
    if tstr:
        bars.append(("synthetic -> real\n(TSTR)", tstr["synthetic_only"]))
    figure, axis = plt.subplots(figsize=(5.2, 3.6))
    for i, (name, stat) in enumerate(bars):
        axis.bar(i, stat["estimate"], color=f"C{i}", alpha=0.7)
        axis.errorbar([i], [stat["estimate"]], yerr=[[stat["estimate"] - stat["low"]], [stat["high"] - stat["estimate"]]], color="black", capsize=4)
    axis.axhline(0.5, color="grey", linestyle=":", label="chance (2 classes)")
    axis.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    axis.set_ylabel(metric.replace("_", " "))
    axis.set_ylim(0, 1)
    axis.set_title("Class signal in the synthetic images (train -> test)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def flat_summary(statistics: dict, champion: dict, gan: dict | None) -> dict:
    """The few numbers of metrics/summary.json (flat, no strings: `dvc metrics show/diff` stays
    readable): the compare metric of each arm at the largest ratio and the real baseline, the
    synthetic-vs-duplicate and oracle-vs-duplicate differences there, the count of significant
    comparisons, the minimum detectable effect, GAN-test, and the champion's test metric."""
    metric = statistics["metric"]
    arms = statistics["arms"]
    # synthetic_only sits at ratio 1 whatever the sweep's ratios are: the top ratio is the other arms'
    top = max((e["ratio"] for e in arms.values() if e["arm"] != "synthetic_only"), default=0.0)
    flat: dict = {}
    for key, entry in arms.items():
        if entry["ratio"] in (0.0, top) or entry["arm"] == "synthetic_only":
            flat[entry["arm"]] = entry[metric]["estimate"]
    for c in statistics["comparisons"]:
        if c["ratio"] == top and c["other"] == "duplicate":
            flat[f"{c['arm']}_minus_duplicate"] = c["difference"]
    flat["n_significant"] = sum(c["significant"] for c in statistics["comparisons"])
    flat["mde"] = statistics["minimum_detectable_effect"]
    if gan:
        flat["gan_test"] = gan[metric]["estimate"]
    flat["champion_test"] = champion["test"][metric]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in flat.items()}
