"""The study's report: one self-contained HTML page (reports/summary.html) a person can open, and
the terminal summary of `ctsynth summary`. ctsynth.stages.report writes the page and logs it.

It collects what the stages wrote — data validation, GAN curves and image grids, synthetic-data
quality and memorisation, the ratio sweep's statistics and plot — and adds the champion's
confusion matrix and ROC curve on the real test split, computed here by running the exported ONNX
model (the file that is served) over the prepared test images through the one preprocessing path.
Every image is embedded as base64, so the page needs no other file and no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ctsynth.config import Params
from ctsynth.paths import resolve

log = logging.getLogger(__name__)

GAN_FIGURES = (
    ("real_vs_synthetic.png", "Real and synthetic images, one pair of rows per class"),
    ("losses.png", "GAN losses per kimg"),
    ("ada_p.png", "ADA augmentation probability p"),
)
SYNTHETIC_METRICS = ("kid", "kid_std", "frechet", "precision", "recall", "density", "coverage")
TABLE_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1")


@dataclass(frozen=True)
class ReportInputs:
    """Where the stages' outputs are (all relative to the repository root)."""

    validation_summary: Path
    gan_report: Path
    synthetic_metrics: Path
    nearest_neighbours: Path
    sweep_summary: Path
    sweep_table: Path
    ratio_plot: Path
    study: Path  # select's details: per arm, comparisons, verdicts, GAN-test, champion
    signal_plot: Path
    onnx_model: Path
    prepared: Path

    @classmethod
    def from_params(cls, params: Params, root: Path) -> "ReportInputs":
        synthetic_report = resolve(params.synthetic.report, root)
        return cls(
            validation_summary=resolve(params.validation.report, root) / "details.json",  # summary.json holds only DVC's few numbers
            gan_report=resolve(params.gan.report, root),
            synthetic_metrics=synthetic_report / "details.json",
            nearest_neighbours=synthetic_report / "nearest_neighbours.png",
            sweep_summary=resolve(params.select.summary, root),
            sweep_table=resolve(params.select.report, root),
            ratio_plot=resolve(params.select.plot, root),
            study=resolve(params.select.details, root),
            signal_plot=resolve(params.select.signal_plot, root),
            onnx_model=resolve(params.select.onnx, root),
            prepared=resolve(params.data.prepared, root),
        )

    def required(self) -> list[Path]:
        gan = [self.gan_report / name for name, _ in GAN_FIGURES]
        return [self.validation_summary, *gan, self.synthetic_metrics, self.nearest_neighbours,
                self.sweep_summary, self.sweep_table, self.ratio_plot, self.study, self.signal_plot, self.onnx_model,
                self.prepared / "manifest.csv"]


# ------------------------------------------------------------------------------------------------
# Champion on the test split


@dataclass(frozen=True)
class ChampionEvaluation:
    classes: list[str]
    y_true: np.ndarray
    probabilities: np.ndarray
    metrics: dict
    provider: str = "CPUExecutionProvider"  # the onnxruntime provider that ran the model

    @property
    def cancer_score(self) -> np.ndarray:
        from ctsynth.classifier.evaluate import positive_class_ids

        return self.probabilities[:, positive_class_ids(self.classes)].sum(axis=1)


def evaluate_onnx_on_split(onnx_model: Path, prepared: Path, split: str, classes: list[str], batch: int = 64,
                           device: str = "auto") -> ChampionEvaluation:
    """Run the exported model over one prepared split (preprocess_bytes inside ImageDataset).
    `device`: a ctsynth.device setting; CUDA runs it with onnxruntime's CUDA provider where present."""
    from ctsynth.classifier.evaluate import classification_metrics
    from ctsynth.data.mixing import ImageDataset, real_split
    from ctsynth.device import resolve_device
    from ctsynth.export import onnx_session, read_onnx_info, softmax

    info = read_onnx_info(onnx_model)
    if list(info.classes) != list(classes):
        raise ValueError(f"{onnx_model} was exported for classes {info.classes}, params.yaml data.classes is {classes}")
    items = real_split(prepared, split, classes)
    inputs = ImageDataset(items, info.resolution).inputs.numpy()
    labels = np.array([classes.index(item.label) for item in items], dtype=np.int64)
    session = onnx_session(onnx_model, resolve_device(device))
    provider = session.get_providers()[0]
    log.info("champion ONNX evaluation on %s with %s", split, provider)
    logits = np.concatenate([session.run(["logits"], {"image": inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)])
    probabilities = softmax(logits)
    return ChampionEvaluation(list(classes), labels, probabilities, classification_metrics(labels, probabilities, list(classes)), provider)


def roc_points(is_positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0,0) to (1,1)."""
    order = np.argsort(-score, kind="stable")
    score, is_positive = score[order], is_positive[order]
    distinct = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # last index of each score value
    tp = np.cumsum(is_positive)[distinct]
    fp = np.cumsum(~is_positive)[distinct]
    n_pos, n_neg = max(int(is_positive.sum()), 1), max(int((~is_positive).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _figure_png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def roc_figure(evaluation: ChampionEvaluation, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctsynth.classifier.evaluate import positive_class_ids

    is_positive = np.isin(evaluation.y_true, positive_class_ids(evaluation.classes))
    fpr, tpr = roc_points(is_positive, evaluation.cancer_score)
    figure, axes = plt.subplots(figsize=(4.2, 4.0))
    axes.plot(fpr, tpr, drawstyle="steps-post", color="C0", label=f"AUC {evaluation.metrics['roc_auc']:.3f}")
    axes.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    axes.set_xlabel("1 - specificity (normal called cancer)")
    axes.set_ylabel("sensitivity (cancer found)")
    axes.set_title(title, fontsize=10)
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _figure_png(figure)


def confusion_figure(evaluation: ChampionEvaluation, title: str) -> bytes:
    from ctsynth.classifier.evaluate import plot_confusion_matrix

    return _figure_png(plot_confusion_matrix(evaluation.metrics["confusion_matrix"], evaluation.classes, title))


# ------------------------------------------------------------------------------------------------
# HTML pieces


def _e(value) -> str:
    return html.escape(str(value))


def _img(png: bytes, alt: str, width: str = "100%") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" style="max-width:{width}" src="data:image/png;base64,{data}">'


def _figure(png: bytes, caption: str, width: str = "100%") -> str:
    return f"<figure>{_img(png, caption, width)}<figcaption>{_e(caption)}</figcaption></figure>"


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    if abs(float(value)) >= 1e4:  # e.g. the KID of an untrained GAN: 1.351e+08, not 135081225.7979
        return f"{float(value):.{digits + 1}g}"
    return f"{float(value):.{digits}f}"


def _interval(stat: dict | None, digits: int = 3) -> str:
    """'mean [low, high]' from a stats.mean_ci / paired_difference dict."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = _number(stat["mean"], digits)
    if stat.get("low") is not None and stat.get("high") is not None:
        text += f" [{_number(stat['low'], digits)}, {_number(stat['high'], digits)}]"
    if stat.get("p_value") is not None:
        text += f" (p {_number(stat['p_value'], 3)})"
    return text


def _table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _badge(success: bool, fails_stage: bool = True) -> str:
    """passed / FAILED (a check that fails its stage) / warning (a failed check that only warns)."""
    if success:
        return '<span class="ok">passed</span>'
    return '<span class="bad">FAILED</span>' if fails_stage else '<span class="warn">warning</span>'


def validation_section(summary: dict) -> str:
    counts = summary.get("counts", {})
    classes = sorted({label for per_class in counts.values() for label in per_class})
    count_rows = [[_e(split), *[_e(per_class.get(c, 0)) for c in classes]] for split, per_class in counts.items()]
    check_rows = []
    for name, check in summary.get("checks", {}).items():
        offending = check.get("offending") or []
        shown = ", ".join(_e(o) for o in offending[:5]) + (" …" if len(offending) > 5 else "")
        check_rows.append([_e(name), _badge(bool(check.get("success")), check.get("severity", "fail") == "fail"), _e(check.get("severity", "")),
                           _e(check.get("n_offending", len(offending))), _e(check.get("description", "")), shown])
    return (
        f"<p>Great Expectations suite on the raw and prepared data: {_badge(bool(summary.get('success')))} "
        f"({_e(summary.get('n_failed_checks', 0))} failed, {_e(summary.get('n_warnings', 0))} warnings).</p>"
        + _table(["split", *classes], count_rows)
        + _table(["check", "result", "severity", "offending", "what it checks", "examples"], check_rows)
    )


def synthetic_section(metrics: dict, nearest_png: bytes) -> str:
    quality = metrics.get("quality", {})
    groups = {"overall": quality.get("overall", {}), **{f"class {k}": v for k, v in quality.get("per_class", {}).items()}}
    rows = []
    for group, entry in groups.items():
        synthetic, floor = entry.get("synthetic", {}), entry.get("floor", {})
        for name in SYNTHETIC_METRICS:
            if name in synthetic or name in floor:
                rows.append([_e(group), _e(name), _number(synthetic.get(name), 4), _number(floor.get(name), 4)])
    memo_rows = []
    memorisation = metrics.get("memorisation", {})
    memo_groups = {"overall": memorisation.get("overall", {}), **{f"class {k}": v for k, v in memorisation.get("per_class", {}).items()}}
    for group, entry in memo_groups.items():
        for which in ("synthetic", "floor"):
            values = entry.get(which) or {}
            fractions = values.get("fraction_below", {})
            memo_rows.append([_e(group), _e("synthetic vs train" if which == "synthetic" else "floor: valid vs train"),
                              _e(values.get("exact_copies", "n/a")),
                              *[_number(fractions.get(p), 3) for p in ("p1", "p5")]])
    checks = metrics.get("checks", {})
    check_rows = [[_e(name), _badge(bool(c.get("success")), bool(c.get("fails_stage", True))), _e(c.get("detail", c.get("description", "")))]
                  for name, c in checks.items()]
    success = metrics.get("success")
    return (
        (f"<p>Synthetic-data checks: {_badge(bool(success))}.</p>" if success is not None else "")
        + "<h3>Quality (synthetic vs. its real-vs-real floor at the same n)</h3>"
        + _table(["group", "metric", "synthetic", "floor"], rows)
        + "<h3>Memorisation (fraction of images closer to a training image than the p1 / p5 train-to-train distance)</h3>"
        + _table(["group", "compared", "exact copies", "fraction < p1", "fraction < p5"], memo_rows)
        + (_table(["check", "result", "detail"], check_rows) if check_rows else "")
        + _figure(nearest_png, "Synthetic images nearest to a training image (with the training image and the difference)")
    )


def _ci(stat: dict | None, digits: int = 3, signed: bool = False) -> str:
    """'estimate [low, high]' from a stats.BootstrapCI / Comparison dict."""
    if not stat:
        return "n/a"
    value = stat.get("estimate", stat.get("difference"))
    if value is None:
        return "n/a"
    fmt = (lambda v: "n/a" if v is None else f"{v:+.{digits}f}") if signed else (lambda v: _number(v, digits))
    return f"{fmt(value)} [{fmt(stat.get('low'))}, {fmt(stat.get('high'))}]"


def arm_rows(study: dict) -> list[list[str]]:
    """arm, ratio, training images, seeds, compare metric mean [two-level CI], test accuracy and
    ROC AUC mean [t-interval over seeds] (plain strings; HTML and terminal share them)."""
    metric = study["metric"]
    rows = []
    for entry in study["arms"].values():
        rows.append([entry["arm"], f"{entry['ratio']:g}", str(entry["n_train"]), str(len(entry["seeds"])), _ci(entry[metric]),
                     _interval(entry.get("test_accuracy")), _interval(entry.get("test_roc_auc"))])
    return rows


ARM_HEADER = ["arm", "ratio", "train images", "seeds", "{metric} [CI]", "test accuracy", "test ROC AUC"]


def sweep_section(study: dict, plot_png: bytes) -> str:
    """The arms figure and table, the comparisons (paired two-level bootstrap, Holm) and verdicts."""
    metric = study["metric"]
    confidence = study["confidence"]
    header = [h.format(metric=metric.replace("_", " ")) for h in ARM_HEADER]
    comparison_rows = [[_e(c["arm"]), _e("real (ratio 0)" if c["other"] == "real" else c["other"]), _e(f"{c['ratio']:g}"),
                        _ci(c, signed=True), _number(c["p_value"]), _number(c["p_holm"]), _number(c["mde"]),
                        '<span class="ok">yes</span>' if c["significant"] else "no"] for c in study["comparisons"]]
    verdicts = "".join(f"<li>{_e(v)}</li>" for v in study["verdicts"])
    return (
        f"<p>{_e(study['n_items'])} classifier runs (arm x ratio x seed) on the real test split of {_e(study['n_test'])} images. "
        f"{_e(metric.replace('_', ' '))}: mean over seeds [{confidence:.0%} CI of a bootstrap over seeds and test images]; "
        "accuracy and AUC: mean [t-interval over seeds].</p>"
        + _figure(plot_png, f"Test {metric.replace('_', ' ')} vs ratio, one line per arm (ratio 0 = the shared real baseline); dots: seeds")
        + _table(header, [[_e(cell) for cell in row] for row in arm_rows(study)], "numbers")
        + f"<h3>Comparisons (paired by seed and test image; Holm over {_e(len(study['comparisons']))}; "
          f"MDE at {_e(format(study['power'], '.0%'))} power)</h3>"
        + (_table(["arm", "vs", "ratio", "difference [CI]", "p", "p (Holm)", "MDE", f"significant at {study['alpha']:g}"], comparison_rows, "numbers")
           if comparison_rows else "<p>No comparison: the matrix has no pair of arms at one ratio.</p>")
        + f"<h3>Verdicts</h3><ul>{verdicts}</ul>"
    )


def signal_text(study: dict) -> str:
    """GAN-test and train-synthetic-test-real in words (beside the synthetic quality metrics)."""
    metric = study["metric"]
    parts = []
    gan = study.get("gan_test")
    if gan:
        parts.append(f"GAN-test (the real-only classifiers on {gan['n_images']} synthetic images labelled with their conditioning class): "
                     f"{metric.replace('_', ' ')} {_ci(gan[metric])}.")
    tstr = study.get("train_synthetic_test_real")
    if tstr:
        parts.append(f"Train-synthetic-test-real (trained on synthetic images only, tested on the real test split): {_ci(tstr['synthetic_only'])}"
                     f" vs {_ci(tstr.get('real'))} when trained on the real images.")
    return " ".join(parts) or "No GAN-test or synthetic-only items in this study."


def champion_section(study: dict, evaluation: ChampionEvaluation, onnx_model: Path) -> str:
    champion = study.get("champion", {})
    registered = champion.get("registered") or {}
    parity = champion.get("onnx", {})
    facts = [
        ["chosen by", _e(champion.get("chosen_by", ""))],
        ["arm", _e(champion.get("arm", ""))],
        ["ratio", _e(champion.get("ratio", ""))],
        ["seed", _e(champion.get("seed", ""))],
        ["MLflow run", _e(champion.get("run_id", ""))],
        ["registered model", _e(f"{registered.get('name')} version {registered.get('version')}") if registered else "not registered"],
        ["@champion", _e(registered.get("reason", "")) if registered else "n/a"],
        ["ONNX file", _e(onnx_model.name)],
        ["ONNX vs PyTorch max |Δ logit|", _number(parity.get("parity_max_abs_logit_diff"), 7)],
        ["ONNX evaluated with", _e(evaluation.provider)],
    ]
    metric_rows = [[_e(m.replace("_", " ")), _number(evaluation.metrics.get(m))] for m in TABLE_METRICS]
    title = f"champion on test (n={evaluation.metrics['n']})"
    return (
        _table(["", ""], facts)
        + "<p>Computed here by running the exported ONNX model over the prepared test split:</p>"
        + _table(["test metric", "value"], metric_rows, "numbers")
        + '<div class="row">'
        + _figure(confusion_figure(evaluation, title), "Confusion matrix (rows: true class)", "420px")
        + _figure(roc_figure(evaluation, title), "ROC curve, cancer vs. normal", "420px")
        + "</div>"
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { border-bottom: 2px solid #345; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #eef2f6; } table.numbers td { font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
.row { display: flex; flex-wrap: wrap; gap: 2em; }
.ok { color: #176d2c; font-weight: bold; } .bad { color: #b00020; font-weight: bold; } .warn { color: #a65f00; font-weight: bold; }
.meta { color: #666; font-size: 0.85em; }
"""


def render_report(params: Params, root: Path, inputs: ReportInputs | None = None, evaluation: ChampionEvaluation | None = None) -> str:
    """The whole HTML page as a string. Raises FileNotFoundError naming every missing input."""
    from ctsynth.paths import git_commit

    inputs = inputs or ReportInputs.from_params(params, root)
    missing = [str(p) for p in inputs.required() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the report needs these stage outputs, missing: {missing} (run `dvc repro` first)")
    validation = json.loads(inputs.validation_summary.read_text())
    synthetic = json.loads(inputs.synthetic_metrics.read_text())
    study = json.loads(inputs.study.read_text())
    evaluation = evaluation or evaluate_onnx_on_split(inputs.onnx_model, inputs.prepared, "test", params.data.classes,
                                                      device=params.classifier.device)
    gan = "".join(_figure((inputs.gan_report / name).read_bytes(), caption) for name, caption in GAN_FIGURES)
    sections = [
        ("Data validation", validation_section(validation)),
        ("GAN training", f"<p>Preset <code>{_e(params.gan.preset)}</code>, {_e(params.gan.kimg)} kimg, "
                         f"{'one model per class' if params.gan.per_class else 'one class-conditional model'}.</p>" + gan),
        ("Synthetic-data quality and memorisation", synthetic_section(synthetic, inputs.nearest_neighbours.read_bytes())
         + "<h3>Do the synthetic images carry the class signal?</h3>" + f"<p>{_e(signal_text(study))}</p>"
         + _figure(inputs.signal_plot.read_bytes(), "Real baseline, GAN-test and train-synthetic-test-real with CIs", "560px")),
        ("The study: arms x ratios x seeds", sweep_section(study, inputs.ratio_plot.read_bytes())),
        ("Champion classifier", champion_section(study, evaluation, inputs.onnx_model)),
    ]
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(f'<h2 id="s{i}">{_e(title)}</h2>{content}' for i, (title, content) in enumerate(sections))
    contents = "".join(f'<li><a href="#s{i}">{_e(title)}</a></li>' for i, (title, _) in enumerate(sections))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>ctsynth study report</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>ctsynth: does StyleGAN2-ADA synthetic data help the classifier?</h1>"
        f'<p class="meta">Classes {_e(", ".join(params.data.classes))} at {_e(params.data.resolution)} px; '
        f"git commit {_e(git_commit(root)[:12])}; written {created}.</p>"
        f"<ol>{contents}</ol>{body}</body></html>\n"
    )


# ------------------------------------------------------------------------------------------------
# The terminal summary `make demo` ends with (`ctsynth summary`)


def study_summary_text(params: Params, root: Path, report: Path | None = None) -> str:
    """The per-arm table with CIs, the verdicts, the champion, and where to look further (plain text)."""
    from ctsynth import tracking

    inputs = ReportInputs.from_params(params, root)
    for path in (inputs.sweep_summary, inputs.study):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `dvc repro` (or `make demo`) first")
    study = json.loads(inputs.study.read_text())
    header = [h.format(metric=study["metric"].replace("_", " ")) for h in ARM_HEADER]
    rows = arm_rows(study)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows])
    lines = [f"The study ({study['n_items']} runs, {study['n_test']} real test images): mean [{study['confidence']:.0%} CI]", table,
             f"Verdicts (paired by seed and test image, Holm over {len(study['comparisons'])} comparisons, alpha {study['alpha']:g}):"]
    lines += [f"  {v}" for v in study["verdicts"]] or ["  none: no pair of arms at one ratio"]
    lines.append(f"  {signal_text(study)}")
    champion = study.get("champion", {})
    registered = champion.get("registered") or {}
    where = (f"{registered.get('name')} version {registered.get('version')}: {registered.get('reason')}" if registered
             else f"{params.select.onnx} (not registered)")
    test = champion.get("test", {})
    lines += [
        f"Champion: arm {champion.get('arm')}, ratio {champion.get('ratio')}, seed {champion.get('seed')}, chosen by {champion.get('chosen_by', '?')}",
        f"  test accuracy {_number(test.get('accuracy'))}, balanced accuracy {_number(test.get('balanced_accuracy'))}, "
        f"ROC AUC {_number(test.get('roc_auc'))}",
        f"  registered as {where}; ONNX file {params.select.onnx}",
    ]
    report = report or root / "reports" / "summary.html"
    lines.append(f"Report: {report}" + ("" if report.exists() else "  (missing: run `dvc repro report`)"))
    lines.append(f"MLflow UI: make ui   (mlflow ui --backend-store-uri {tracking.tracking_uri(root)}, then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning)")
    lines.append("Service: make serve   (then: curl -F image=@data/prepared/test/normal/<file>.png http://127.0.0.1:3000/predict)")
    return "\n".join(lines)
