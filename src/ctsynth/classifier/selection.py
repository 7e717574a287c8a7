"""The `select` stage's library: sweep table, statistics, plot, and the champion choice.

Every item of the sweep is in the table and in the statistics (none is dropped). The champion is
chosen on VALIDATION only: first the ratio with the best mean validation `select.metric` over its
seeds, then, within that ratio, the run with the best validation metric (ties: validation
`select.tie_breaker`, then lower validation loss, then the lower seed). Test metrics are reported,
never used to choose.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ctsynth.classifier.evaluate import METRIC_NAMES
from ctsynth.classifier.stats import mean_ci, paired_difference

log = logging.getLogger(__name__)

SPLITS = ("test", "valid")


def load_sweep_records(metrics_dir: Path) -> list[dict]:
    files = sorted(Path(metrics_dir).glob("*_r*_s*.json"))
    if not files:
        raise FileNotFoundError(f"no sweep results (<arm>_r<ratio>_s<seed>.json) in {metrics_dir}; run the train_classifier stage first")
    records = []
    for path in files:
        try:
            record = json.loads(path.read_text())
            record["ratio"], record["seed"], record["valid"], record["test"]  # noqa: B018 (schema check)
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"sweep result {path} is not a train_classifier metrics file ({exc})") from exc
        record["_file"] = str(path)
        records.append(record)
    return records


def _number(value) -> float:
    return math.nan if value is None else float(value)


def sweep_table(records: list[dict]) -> pd.DataFrame:
    """One row per (ratio, seed): validation and test metrics, epochs, where the weights are."""
    rows = []
    for record in records:
        row = {"ratio": float(record["ratio"]), "seed": int(record["seed"]), "ratio_label": record.get("ratio_label", str(record["ratio"]))}
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
    table = pd.DataFrame(rows).sort_values(["ratio", "seed"], kind="stable").reset_index(drop=True)
    duplicated = table[table.duplicated(["ratio", "seed"], keep=False)]
    if len(duplicated):
        raise ValueError(f"sweep results hold (ratio, seed) more than once: {duplicated[['ratio', 'seed']].values.tolist()}")
    return table


def summarize(table: pd.DataFrame, baseline_ratio: float = 0.0, confidence: float = 0.95) -> dict:
    """Per ratio: mean +- CI of every metric on both splits; per ratio != baseline: the paired
    difference against the baseline ratio (same seeds) with its CI and paired t-test p-value."""
    ratios = sorted(table["ratio"].unique())
    summary: dict = {"confidence": confidence, "baseline_ratio": baseline_ratio, "n_runs": int(len(table)), "ratios": {}}
    baseline = table[np.isclose(table["ratio"], baseline_ratio)]
    for ratio in ratios:
        rows = table[np.isclose(table["ratio"], ratio)]
        entry: dict = {"n_seeds": int(len(rows)), "seeds": rows["seed"].tolist()}
        for split in SPLITS:
            for metric in METRIC_NAMES:
                column = f"{split}_{metric}"
                entry[column] = mean_ci(rows[column].tolist(), confidence).as_dict()
                if len(baseline) and not math.isclose(ratio, baseline_ratio):
                    difference = paired_difference(dict(zip(baseline["seed"], baseline[column])), dict(zip(rows["seed"], rows[column])), confidence)
                    entry[f"{column}_minus_baseline"] = difference.as_dict()
        summary["ratios"][f"{ratio:g}"] = entry
    return summary


def choose_champion(table: pd.DataFrame, metric: str, tie_breaker: str) -> tuple[float, pd.Series, pd.DataFrame]:
    """(best ratio, best run's row, ranking of ratios) by validation metrics only."""
    key, tie = f"valid_{metric}", f"valid_{tie_breaker}"
    ranking = (
        table.groupby("ratio")[[key, tie]].mean().reset_index()
        .sort_values([key, tie, "ratio"], ascending=[False, False, True], kind="stable", na_position="last")
    )
    best_ratio = float(ranking.iloc[0]["ratio"])
    candidates = table[np.isclose(table["ratio"], best_ratio)].sort_values(
        [key, tie, "valid_loss", "seed"], ascending=[False, False, True, True], kind="stable", na_position="last"
    )
    best = candidates.iloc[0]
    log.info("champion: ratio %g (mean %s %.4f), seed %d (%s %.4f)", best_ratio, key, ranking.iloc[0][key], best["seed"], key, best[key])
    return best_ratio, best, ranking


def plot_rows(summary: dict, split: str = "test") -> pd.DataFrame:
    """Long table ratio, metric, mean, low, high (the DVC plot data and the PNG's numbers)."""
    rows = []
    for ratio_key, entry in summary["ratios"].items():
        for metric in METRIC_NAMES:
            stat = entry[f"{split}_{metric}"]
            rows.append({"ratio": float(ratio_key), "metric": metric, "mean": stat["mean"], "low": stat["low"], "high": stat["high"], "n": stat["n"]})
    return pd.DataFrame(rows)


def plot_ratio_vs_metric(table: pd.DataFrame, summary: dict, path: Path, split: str = "test") -> Path:
    """One panel per metric: every seed as a dot, mean +- CI as error bars, per synthetic ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plot_rows(summary, split)
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    for axis, metric in zip(axes.ravel(), METRIC_NAMES):
        rows = data[data["metric"] == metric]
        low = (rows["mean"] - rows["low"]).fillna(0).to_numpy()
        high = (rows["high"] - rows["mean"]).fillna(0).to_numpy()
        axis.errorbar(rows["ratio"], rows["mean"], yerr=[low, high], fmt="o-", capsize=4, color="C0", label=f"mean ± {summary['confidence']:.0%} CI")
        axis.scatter(table["ratio"], table[f"{split}_{metric}"], s=12, color="C1", alpha=0.6, label="one seed")
        axis.set_title(metric.replace("_", " "))
        axis.set_xlabel("synthetic / real (per class)")
        axis.grid(alpha=0.3)
    axes.ravel()[0].legend(fontsize=8)
    figure.suptitle(f"{split} split (real images) vs synthetic ratio, {summary['n_runs']} runs")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def run_select(params, root: Path) -> dict:
    """The whole `select` stage: table, summary, plot, champion, ONNX export + parity, registry."""
    import torch

    from ctsynth import tracking
    from ctsynth.classifier.train import build_classifier
    from ctsynth.data.mixing import ImageDataset, real_split
    from ctsynth.export import check_parity, export_onnx

    def under(path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else root / path

    select = params.select
    records = load_sweep_records(under(params.sweep.metrics_dir))
    table = sweep_table(records)
    report = under(select.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(report, index=False, float_format="%.6f")

    summary = summarize(table, select.baseline_ratio, select.confidence)
    best_ratio, best, ranking = choose_champion(table, select.metric, select.tie_breaker)
    summary["champion"] = {
        "chosen_by": f"validation {select.metric} (tie: {select.tie_breaker})",
        "ratio": best_ratio,
        "seed": int(best["seed"]),
        "run_id": best["run_id"],
        f"valid_{select.metric}": float(best[f"valid_{select.metric}"]),
        "test": {m: float(best[f"test_{m}"]) for m in METRIC_NAMES},
        "ratio_ranking": ranking.to_dict(orient="records"),
    }
    plot_ratio_vs_metric(table, summary, under(select.plot))
    plot_data = under(select.plot_data)
    plot_rows(summary).to_csv(plot_data, index=False, float_format="%.6f")

    # Rebuild the chosen run's model from its weights, export it and check onnxruntime against it.
    classes = params.data.classes
    model = build_classifier(params.classifier, len(classes), structure_only=True)
    state_path = under(str(best["state_dict"]))
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    model.eval()
    onnx_path = export_onnx(model, params.classifier.resolution, classes, under(select.onnx),
                            extra_metadata={"ratio": f"{best_ratio:g}", "seed": str(int(best["seed"])), "run_id": str(best["run_id"])})
    valid_inputs = ImageDataset(real_split(under(params.data.prepared), "valid", classes), params.classifier.resolution).inputs.numpy()
    max_diff = check_parity(model, onnx_path, valid_inputs, atol=select.parity_tolerance)
    summary["champion"]["onnx"] = {"path": str(select.onnx), "parity_max_abs_logit_diff": max_diff, "tolerance": select.parity_tolerance, "n_images": int(len(valid_inputs))}

    summary_path = under(select.summary)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")

    if select.register_champion:
        from ctsynth.registry import register_champion

        parent = str(best["parent_run_id"]) or None
        if parent:
            _log_summary_to_parent(parent, summary, table, report, under(select.plot), root)
        champion_record = next(r for r in records if int(r["seed"]) == int(best["seed"]) and math.isclose(float(r["ratio"]), best_ratio))
        version = register_champion(
            onnx_path,
            state_path,
            metrics={"ratio": best_ratio, "seed": int(best["seed"]), **{f"valid_{m}": champion_record["valid"][m] for m in METRIC_NAMES},
                     **{f"test_{m}": champion_record["test"][m] for m in METRIC_NAMES}, "onnx_parity_max_abs_diff": max_diff},
            params={"classifier": params.classifier.model_dump(), "ratio": best_ratio, "seed": int(best["seed"])},
            input_example=valid_inputs[:2],
            run_id=parent,
            artifacts={"summary": summary_path, "sweep": report},
            tags={"source_run_id": str(best["run_id"]), "ratio": f"{best_ratio:g}", "seed": str(int(best["seed"]))},
            root=root,
        )
        summary["champion"]["registered"] = {"name": tracking.REGISTERED_MODEL, "version": version, "alias": tracking.CHAMPION_ALIAS}
        summary_path.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return summary


def _log_summary_to_parent(parent_run_id: str, summary: dict, table: pd.DataFrame, report: Path, plot: Path, root: Path) -> None:
    """Mean per ratio as parent-run metrics (step = ratio x 100) and the report files as artifacts."""
    from mlflow import MlflowClient

    from ctsynth import tracking

    tracking.configure(root)
    client = MlflowClient()
    for ratio_key, entry in summary["ratios"].items():
        step = int(round(float(ratio_key) * 100))
        for metric in METRIC_NAMES:
            for split in SPLITS:
                value = entry[f"{split}_{metric}"]["mean"]
                if value is not None and not math.isnan(value):
                    client.log_metric(parent_run_id, f"mean_{split}_{metric}", value, step=step)
    for path in (report, plot):
        client.log_artifact(parent_run_id, str(path), artifact_path="sweep")
