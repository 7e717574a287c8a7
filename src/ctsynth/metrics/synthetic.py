"""Is the synthetic set realistic, varied, and not a copy of the training set? The numbers and checks
of the `validate_synthetic` stage (ctsynth.stages.validate_synthetic reads the folders, writes the
files and logs the run).

Which sets are compared, so that every synthetic number has a real-vs-real floor computed the
same way:

    real train split, per class, split at random into halves A and B (seeded)
    feature space fitted on A only                   -> B and the synthetic images are out of sample
    synthetic : metric(A, S)   S = synthetic images of the class, drawn down to |B| images
    floor     : metric(A, B)   what two real samples of the same size give

KID is unbiased, so its floor is ~0 with a spread; the Fréchet distance and precision/recall
depend on n and the feature size, so only the comparison with the floor at the same n means
anything. Memorisation compares each synthetic image with ALL training images (pixels, at the
data resolution); its floor is the same statistic for the real validation images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ctsynth.config import DataParams, SyntheticParams, ValidateParams
from ctsynth.data.manifest import MANIFEST_COLUMNS, STATUS_OK, STATUS_UNREADABLE, phash, sha256_bytes
from ctsynth.data.preprocess import ImageDecodeError, decode_image, preprocess_bytes, square_resize
from ctsynth.metrics.features import InceptionFeatures, PixelPCAFeatures, find_inception_weights
from ctsynth.metrics.frechet import frechet_distance
from ctsynth.metrics.kid import kernel_inception_distance
from ctsynth.metrics.memorisation import memorisation
from ctsynth.metrics.prdc import precision_recall_density_coverage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SYNTHETIC_MANIFEST = "manifest.csv"
SYNTHETIC_REQUIRED_COLUMNS = ("path", "label", "label_id", "seed")
SYNTHETIC_SPLIT = "synthetic"


@dataclass
class ImageSet:
    images: np.ndarray  # N x 1 x R x R in [-1, 1]
    labels: np.ndarray  # N, class names
    names: list[str]  # paths as written in the manifest
    unreadable: list[dict] = field(default_factory=list)


def read_synthetic_manifest(folder: Path) -> pd.DataFrame:
    path = Path(folder) / SYNTHETIC_MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no synthetic manifest at {path}: run `ctsynth generate` first")
    frame = pd.read_csv(path, dtype={"path": str, "label": str}, keep_default_na=False)
    missing = [c for c in SYNTHETIC_REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"synthetic manifest {path} lacks columns {missing} (needs {list(SYNTHETIC_REQUIRED_COLUMNS)})")
    if frame.empty:
        raise ValueError(f"synthetic manifest {path} has no rows")
    return frame


def load_images(folder: Path, paths: list[str], labels: list[str], resolution: int, desc: str) -> ImageSet:
    """Read images through THE preprocessing path; unreadable files are listed, not fatal, so the
    report can say which ones they were."""
    images, kept_labels, names, unreadable = [], [], [], []
    for rel_path, label in tqdm(list(zip(paths, labels)), desc=desc, unit="img", leave=False):
        file = Path(folder) / rel_path
        try:
            images.append(preprocess_bytes(file.read_bytes(), resolution))
        except (OSError, ImageDecodeError) as exc:
            unreadable.append({"path": rel_path, "error": f"{exc.__class__.__name__}: {exc}"})
            continue
        kept_labels.append(label)
        names.append(rel_path)
    if unreadable:
        log.warning("%d of %d images in %s could not be read, first: %s", len(unreadable), len(paths), folder, unreadable[0])
    stacked = np.stack(images) if images else np.zeros((0, 1, resolution, resolution), np.float32)
    return ImageSet(stacked, np.asarray(kept_labels, dtype=object), names, unreadable)


def split_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random halves of the indices (A gets the extra image of an odd class)."""
    rng = np.random.default_rng(seed)
    half_a, half_b = [], []
    for label in sorted(set(labels)):
        index = rng.permutation(np.flatnonzero(labels == label))
        cut = (len(index) + 1) // 2
        half_a.append(index[:cut])
        half_b.append(index[cut:])
    return np.sort(np.concatenate(half_a)), np.sort(np.concatenate(half_b))


def compare(reference: np.ndarray, candidate: np.ndarray, params: SyntheticParams, seed: int) -> dict[str, Any]:
    """KID, Fréchet distance and k-NN precision/recall of `candidate` against `reference` features."""
    out: dict[str, Any] = {"n_reference": int(len(reference)), "n_candidate": int(len(candidate))}
    if min(len(reference), len(candidate)) <= params.pr_k:
        out["skipped"] = f"need more than pr_k={params.pr_k} images per set"
        return out
    kid_mean, kid_std = kernel_inception_distance(reference, candidate, params.kid_subsets, params.kid_subset_size, seed)
    out.update({"kid": kid_mean, "kid_std": kid_std, "frechet": frechet_distance(reference, candidate)})
    out.update(precision_recall_density_coverage(reference, candidate, k=params.pr_k))
    return out


def _matched_subsets(
    half_b: np.ndarray, synthetic: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays drawing both sets down to the same size, so floor and synthetic share n."""
    n = min(len(half_b), len(synthetic))
    return np.sort(rng.choice(half_b, n, replace=False)), np.sort(rng.choice(synthetic, n, replace=False))


def quality_metrics(
    train: ImageSet,
    synthetic: ImageSet,
    classes: list[str],
    params: SyntheticParams,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Distribution metrics overall and per class, each with its real-vs-real floor (the
    Inception features, when used, on `device`; the pixel-PCA space is numpy on the CPU)."""
    half_a, half_b = split_halves(train.labels, params.seed)
    feature_space = PixelPCAFeatures.fit(train.images[half_a], params.pca_components, params.pca_resolution, params.seed)
    train_features = feature_space(train.images)
    synthetic_features = feature_space(synthetic.images)

    weights, reason = find_inception_weights(params.inception_weights)
    inception = None
    if weights is None:
        log.info("Inception FID skipped: %s", reason)
    else:
        log.info("Inception FID with %s", reason)
        inception = InceptionFeatures(weights, device=str(device))
        inception_train, inception_synthetic = inception(train.images), inception(synthetic.images)

    rng = np.random.default_rng(params.seed)
    groups: dict[str, dict[str, Any]] = {}
    matched_b, matched_s = [], []
    for label in classes:
        a = half_a[train.labels[half_a] == label]
        b = half_b[train.labels[half_b] == label]
        s = np.flatnonzero(synthetic.labels == label)
        if len(s) == 0 or len(b) == 0:
            groups[label] = {"skipped": f"{len(s)} synthetic and {len(b)} held-out real images of class {label}"}
            continue
        b, s = _matched_subsets(b, s, rng)
        matched_b.append(b)
        matched_s.append(s)
        groups[label] = _group_metrics(a, b, s, train_features, synthetic_features, params)
        if inception is not None:
            groups[label]["fid_inception"] = _inception_fid(a, b, s, inception_train, inception_synthetic)
    if matched_b:
        b, s = np.concatenate(matched_b), np.concatenate(matched_s)
        overall = _group_metrics(half_a, b, s, train_features, synthetic_features, params)
        if inception is not None:
            overall["fid_inception"] = _inception_fid(half_a, b, s, inception_train, inception_synthetic)
    else:
        overall = {"skipped": "no class has both synthetic and held-out real images"}
    if inception is None:
        overall["fid_inception"] = {"synthetic": None, "floor": None, "reason": reason}

    return {
        "feature_space": {
            "name": feature_space.name,
            "dim": feature_space.dim,
            "pca_components": int(feature_space.pca.n_components_),
            "pca_resolution": params.pca_resolution,
            "pca_explained_variance_ratio": float(feature_space.pca.explained_variance_ratio_.sum()),
            "fitted_on": f"train half A ({len(half_a)} images)",
        },
        "overall": overall,
        "per_class": groups,
    }


def _group_metrics(a, b, s, train_features, synthetic_features, params: SyntheticParams) -> dict[str, Any]:
    reference = train_features[a]
    return {
        "synthetic": compare(reference, synthetic_features[s], params, params.seed),
        "floor": compare(reference, train_features[b], params, params.seed),
    }


def _inception_fid(a, b, s, inception_train, inception_synthetic) -> dict[str, Any]:
    return {
        "synthetic": frechet_distance(inception_train[a], inception_synthetic[s]),
        "floor": frechet_distance(inception_train[a], inception_train[b]),
        "reason": f"2048-d Gaussians from {len(a)} and {len(b)} images: dominated by estimation noise below ~2048",
    }


def memorisation_metrics(
    train: ImageSet, synthetic: ImageSet, valid: ImageSet, classes: list[str], params: SyntheticParams
) -> tuple[dict[str, Any], Any]:
    """Synthetic-to-train nearest-neighbour distances, with the real validation images as floor."""
    kwargs = {"copy_tolerance": params.copy_tolerance, "num_closest": params.nearest_neighbour_rows}
    overall = memorisation(synthetic.images, train.images, synthetic.names, train.names, **kwargs)
    out: dict[str, Any] = {
        "overall": {
            "synthetic": overall.summary(),
            "floor": memorisation(valid.images, train.images, valid.names, train.names, **kwargs).summary()
            if len(valid.images)
            else None,
        },
        "per_class": {},
    }
    for label in classes:
        s, t, v = synthetic.labels == label, train.labels == label, valid.labels == label
        if s.sum() == 0 or t.sum() < 2:
            continue
        names = lambda image_set, mask: [n for n, keep in zip(image_set.names, mask) if keep]  # noqa: E731
        out["per_class"][label] = {
            "synthetic": memorisation(synthetic.images[s], train.images[t], names(synthetic, s), names(train, t), **kwargs).summary(),
            "floor": memorisation(valid.images[v], train.images[t], names(valid, v), names(train, t), **kwargs).summary()
            if v.sum()
            else None,
        }
    return out, overall


def nearest_neighbour_figure(synthetic: ImageSet, train: ImageSet, result, rows: int, path: Path) -> Path:
    """The synthetic images closest to a training image, each beside that image and |difference|:
    the pairs a person should look at first when judging memorisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(result.nearest_distance)[:rows]
    fig, axes = plt.subplots(len(order), 3, figsize=(6.0, 2.1 * len(order)), squeeze=False)
    for row, i in enumerate(order):
        fake = synthetic.images[i, 0]
        real = train.images[result.nearest_index[i], 0]
        panels = (
            (fake, f"synthetic {synthetic.labels[i]}\n{Path(synthetic.names[i]).name}", (-1, 1)),
            (real, f"nearest train\n{Path(train.names[result.nearest_index[i]]).name}", (-1, 1)),
            (np.abs(fake - real), f"|difference|\nRMS {result.nearest_distance[i]:.3f}", (0, 1)),
        )
        for ax, (image, title, (vmin, vmax)) in zip(axes[row], panels):
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    p1 = result.percentiles.get("p1")
    fig.suptitle(f"Closest synthetic-train pairs (train-train NN p1 = {p1:.3f})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def synthetic_manifest_rows(frame: pd.DataFrame, folder: Path, resolution: int) -> pd.DataFrame:
    """The synthetic manifest in the prepare manifest's columns (split "synthetic"), so the validate
    stage's suite runs on it unchanged: decoded size and mode, bytes hash, pHash and std of the
    image as preprocessed to the data resolution (the same as the real train rows)."""
    rows = []
    for record in frame.to_dict("records"):
        rel = str(record["path"])
        row = {column: "" for column in MANIFEST_COLUMNS}
        row.update({"path": rel, "split": SYNTHETIC_SPLIT, "label": str(record["label"]), "label_id": record["label_id"],
                    "source_path": rel, "status": STATUS_OK})
        try:
            data = (Path(folder) / rel).read_bytes()
            decoded = decode_image(data)
        except (OSError, ImageDecodeError) as exc:
            row.update({"status": STATUS_UNREADABLE, "error": f"{exc.__class__.__name__}: {exc}"})
            rows.append(row)
            continue
        pixels = square_resize(decoded.pixels, resolution)
        row.update({"width": decoded.width, "height": decoded.height, "mode": decoded.mode, "sha256": sha256_bytes(data),
                    "phash": phash(pixels), "mean": float(pixels.mean() / 255.0), "std": float(pixels.std() / 255.0)})
        rows.append(row)
    out = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for column in ("width", "height", "mean", "std", "label_id"):
        out[column] = pd.to_numeric(out[column], errors="coerce")
    return out


def suite_checks(
    synthetic_manifest: pd.DataFrame,
    synthetic_dir: Path,
    train_manifest: pd.DataFrame,
    prepared_dir: Path,
    data_params: DataParams,
    validate_params: ValidateParams,
    params: SyntheticParams,
) -> dict[str, dict[str, Any]]:
    """The validate stage's Great Expectations checks on the synthetic manifest, with the real train
    split as the reference: leakage_exact / leakage_near then mean "a synthetic image is a (near)
    copy of a training image", duplicates_within_split means "the generator repeats itself"."""
    from ctsynth.validation.suite import run_checks

    rows = synthetic_manifest_rows(synthetic_manifest, synthetic_dir, data_params.resolution)
    suite_params = validate_params.model_copy(
        update={"class_count_bounds": {SYNTHETIC_SPLIT: [params.min_per_class, 10**9]}, "fail_on": list(params.fail_on)}
    )
    results, _ = run_checks(rows, data_params, suite_params, image_root=synthetic_dir, reference=train_manifest,
                            reference_root=prepared_dir, splits=[SYNTHETIC_SPLIT])
    return {
        result.name: {"success": result.success, "detail": result.description, "offending": result.offending, "source": "validate suite (GX)"}
        for result in results
    }


def quality_checks(metrics: dict[str, Any], params: SyntheticParams) -> dict[str, dict[str, Any]]:
    """The stage's own pass/fail checks on the numbers (the manifest checks come from the suite)."""
    synthetic_memo = metrics["memorisation"]["overall"]["synthetic"]
    fraction = synthetic_memo["fraction_below"][params.memorisation_percentile]
    checks = {
        "exact_copies": {
            "success": synthetic_memo["exact_copies"] == 0,
            "detail": f"{synthetic_memo['exact_copies']} synthetic images within RMS {params.copy_tolerance} of a training image",
        },
        "memorisation": {
            "success": fraction <= params.memorisation_max_fraction,
            "detail": f"{fraction:.3f} of synthetic images are closer to a training image than the "
            f"{params.memorisation_percentile} train-train NN distance (limit {params.memorisation_max_fraction})",
        },
    }
    overall = metrics["quality"]["overall"]
    if "synthetic" in overall and "kid" in overall["synthetic"]:
        kid, floor = overall["synthetic"]["kid"], overall["floor"]
        # The floor's KID is ~0 +- its std; compare against the spread, never against a value near 0.
        allowed = params.kid_max_ratio * max(abs(floor["kid"]) + floor["kid_std"], 1e-6)
        checks["kid"] = {
            "success": kid <= allowed,
            "detail": f"KID {kid:.4g} vs. limit {allowed:.4g} ({params.kid_max_ratio} x (|floor| + floor std))",
        }
    return checks


# Short keys: `dvc metrics show` prints one column per key, and the whole row must fit a terminal.
HEADLINE_KEYS = {"kid": "kid", "frechet": "fd", "precision": "prec", "recall": "recall"}
HEADLINE_DIGITS = 4  # significant digits: the floors' spread is far wider than the 5th digit


def _significant(value: float) -> float:
    return float(f"{value:.{HEADLINE_DIGITS}g}")


def headline_metrics(metrics: dict[str, Any], params: SyntheticParams) -> dict[str, float | int]:
    """The numbers worth comparing across experiments, for `dvc metrics show/diff` and
    `dvc exp show`: flat keys, numbers only, each quality number beside its real-vs-real floor
    (`<key>_floor`): kid, fd (Fréchet distance), prec and recall (k-NN precision/recall), memo (the
    fraction of synthetic images closer to a training image than the memorisation percentile),
    copies (exact copies of training images), failed_checks. A number that could not be computed
    (too few images) is left out, not written as null."""
    headline: dict[str, float | int] = {"failed_checks": len(metrics["failures"])}
    overall = metrics["quality"]["overall"]
    for key, short in HEADLINE_KEYS.items():
        for which, suffix in (("synthetic", ""), ("floor", "_floor")):
            value = (overall.get(which) or {}).get(key)
            if value is not None:
                headline[f"{short}{suffix}"] = _significant(value)
    memo = metrics["memorisation"]["overall"]
    for which, suffix in (("synthetic", ""), ("floor", "_floor")):
        if memo.get(which):
            headline[f"memo{suffix}"] = _significant(memo[which]["fraction_below"][params.memorisation_percentile])
    headline["copies"] = int(memo["synthetic"]["exact_copies"])
    return headline


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers as flat MLflow metric names."""
    flat: dict[str, float] = {}
    groups = {"overall": metrics["quality"]["overall"], **{f"class.{k}": v for k, v in metrics["quality"]["per_class"].items()}}
    for group, values in groups.items():
        for which in ("synthetic", "floor"):
            for key in ("kid", "kid_std", "frechet", "precision", "recall", "density", "coverage"):
                value = values.get(which, {}).get(key) if isinstance(values.get(which), dict) else None
                if value is not None:
                    flat[f"{group}.{key}{'' if which == 'synthetic' else '_floor'}"] = float(value)
        fid = values.get("fid_inception") or {}
        for which in ("synthetic", "floor"):
            if fid.get(which) is not None:
                flat[f"{group}.fid_inception{'' if which == 'synthetic' else '_floor'}"] = float(fid[which])
    memo = metrics["memorisation"]["overall"]
    for which in ("synthetic", "floor"):
        if memo.get(which):
            suffix = "" if which == "synthetic" else "_floor"
            for name, value in memo[which]["fraction_below"].items():
                flat[f"memorisation.fraction_below_{name}{suffix}"] = float(value)
            flat[f"memorisation.exact_copies{suffix}"] = float(memo[which]["exact_copies"])
            flat[f"memorisation.nn_median{suffix}"] = float(memo[which]["nn_median"])
    flat["success"] = float(metrics["success"])
    return flat
