"""The `select` stage's library: the study's table, statistics, verdicts, plots, and the champion.

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

import json
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


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def run_select(params, root: Path) -> dict:
    """The whole `select` stage: table, statistics, verdicts, plots, champion, ONNX export + parity,
    registry (promoted only when better). Returns the study's details (reports/study.json)."""
    import torch

    from ctsynth.classifier.train import build_classifier
    from ctsynth.data.mixing import ImageDataset, real_split
    from ctsynth.export import check_parity, export_onnx

    select = params.select
    records = load_sweep_records(params, resolve(params.sweep.metrics_dir, root))
    table = sweep_table(records)
    report = resolve(select.report, root)
    report.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(report, index=False, float_format="%.6f")

    classes = params.data.classes
    study = study_statistics(records, classes, select)
    study["gan_test"] = gan_test(params, records, root, select)
    for line in study["verdicts"]:
        log.info("verdict: %s", line)
    (arm, best_ratio), best, ranking = choose_champion(table, select.metric, select.tie_breaker)
    study["champion"] = {
        "chosen_by": f"validation {select.metric} (tie: {select.tie_breaker}), over every arm",
        "arm": arm,
        "ratio": best_ratio,
        "seed": int(best["seed"]),
        "name": str(best["name"]),
        "run_id": best["run_id"],
        f"valid_{select.metric}": float(best[f"valid_{select.metric}"]),
        "test": {m: float(best[f"test_{m}"]) for m in METRIC_NAMES},
        "ranking": ranking.to_dict(orient="records"),
    }
    plot_arms(table, study, resolve(select.plot, root))
    plot_signal(study, study["gan_test"], resolve(select.signal_plot, root))
    plot_rows(study).to_csv(resolve(select.plot_data, root), index=False, float_format="%.6f")

    # Rebuild the chosen run's model from its weights, export it and check onnxruntime against it.
    model = build_classifier(params.classifier, len(classes), structure_only=True)
    state_path = resolve(str(best["state_dict"]), root)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    model.eval()
    onnx_path = export_onnx(model, params.classifier.resolution, classes, resolve(select.onnx, root),
                            extra_metadata={"arm": arm, "ratio": f"{best_ratio:g}", "seed": str(int(best["seed"])), "run_id": str(best["run_id"])})
    valid_inputs = ImageDataset(real_split(resolve(params.data.prepared, root), "valid", classes), params.classifier.resolution).inputs.numpy()
    max_diff = check_parity(model, onnx_path, valid_inputs, atol=select.parity_tolerance)
    study["champion"]["onnx"] = {"path": str(select.onnx), "parity_max_abs_logit_diff": max_diff, "tolerance": select.parity_tolerance, "n_images": int(len(valid_inputs))}

    summary_path, details_path = resolve(select.summary, root), resolve(select.details, root)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    details_path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        summary_path.write_text(json.dumps(_jsonable(flat_summary(study, study["champion"], study["gan_test"])), indent=2) + "\n")
        details_path.write_text(json.dumps(_jsonable(study), indent=1) + "\n")

    write()
    if select.register_champion:
        from ctsynth.registry import promote_if_better, register_champion

        parent = str(best["parent_run_id"]) or None
        if parent:
            _log_study_to_parent(parent, study, table, report, [resolve(select.plot, root), resolve(select.signal_plot, root)], root)
        champion_record = next(r for r in records if r["name"] == best["name"])
        valid_labels = np.array([item.label_id for item in real_split(resolve(params.data.prepared, root), "valid", classes)])
        decision = promote_if_better(onnx_path, valid_inputs, valid_labels, classes, select.metric, select.promote, root=root)
        version = register_champion(
            onnx_path,
            state_path,
            metrics={"ratio": best_ratio, "seed": int(best["seed"]), **{f"valid_{m}": champion_record["valid"][m] for m in METRIC_NAMES},
                     **{f"test_{m}": champion_record["test"][m] for m in METRIC_NAMES}, "onnx_parity_max_abs_diff": max_diff},
            params={"classifier": params.classifier.model_dump(), "arm": arm, "ratio": best_ratio, "seed": int(best["seed"])},
            input_example=valid_inputs[:2],
            run_id=parent,
            artifacts={"summary": summary_path, "study": details_path, "sweep": report},
            tags={"source_run_id": str(best["run_id"]), "arm": arm, "ratio": f"{best_ratio:g}", "seed": str(int(best["seed"])), **decision.tags},
            root=root,
            move_alias=decision.promote,
            description=decision.reason,
        )
        study["champion"]["registered"] = {"name": "ctsynth-classifier", "version": version, "promoted": decision.promote, "reason": decision.reason}
        write()
    return study


def _log_study_to_parent(parent_run_id: str, study: dict, table: pd.DataFrame, report: Path, plots: list[Path], root: Path) -> None:
    """The comparisons table and the verdicts on the sweep's parent run (plus per-arm means as
    metrics, step = ratio x 100), so the MLflow UI shows the study's answer next to its children."""
    import tempfile

    from mlflow import MlflowClient

    from ctsynth import tracking

    tracking.configure(root)
    client = MlflowClient()
    metric = study["metric"]
    for entry in study["arms"].values():
        value = entry[metric]["estimate"]
        if value is not None and not math.isnan(value):
            client.log_metric(parent_run_id, f"mean_test_{metric}/{entry['arm']}", value, step=int(round(entry["ratio"] * 100)))
    comparisons = pd.DataFrame([{k: c[k] for k in ("arm", "other", "ratio", "difference", "low", "high", "p_value", "p_holm", "mde", "significant")}
                                for c in study["comparisons"]])
    with tempfile.TemporaryDirectory() as tmp:
        table_path, verdict_path = Path(tmp) / "comparisons.csv", Path(tmp) / "verdicts.txt"
        comparisons.to_csv(table_path, index=False, float_format="%.6f")
        verdict_path.write_text("\n".join(study["verdicts"]) + "\n")
        for path in (table_path, verdict_path, report, *plots):
            client.log_artifact(parent_run_id, str(path), artifact_path="study")
    client.set_tag(parent_run_id, "verdicts", "\n".join(study["verdicts"])[:4900])
