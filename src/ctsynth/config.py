"""Typed configuration: params.yaml is read here and nowhere else.

Each DVC stage owns one top-level section of params.yaml (as in iterative/example-get-started),
and each section is a pydantic model below. Unknown keys are errors, so a typo in params.yaml or
in ``dvc exp run -S`` fails loudly instead of silently running the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ctsynth.device import DeviceSetting
from ctsynth.paths import repo_root

DEFAULT_PARAMS_FILE = "params.yaml"


# Every choice a params key offers is one Literal here; the name lists the code checks against
# (backbones, heads, arms, presets, ...) are derived from them with typing.get_args, so adding a
# choice is one edit and pydantic rejects an unknown one when params.yaml is read.
Backbone = Literal["resnet18", "resnet34", "resnet50", "smallcnn"]
Head = Literal["linear", "mlp", "reference"]
Optimizer = Literal["adam", "adamw", "sgd"]
Monitor = Literal["valid_loss", "valid_balanced_accuracy", "valid_roc_auc"]
InferencePrecision = Literal["auto", "bf16", "fp32"]
# synthetic | duplicate | classic | oracle (at every ratio > 0) | synthetic_only (ratio 1 only)
Arm = Literal["synthetic", "duplicate", "classic", "oracle", "synthetic_only"]
ClassicOp = Literal["hflip", "rotate", "scale", "intensity", "elastic"]
Executor = Literal["local", "ray"]
OracleSource = Literal["phantom", "holdout"]
# The classification metrics every evaluation reports, in the order tables show them.
Metric = Literal["accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1"]
PromotePolicy = Literal["better", "always"]
GanPreset = Literal["auto", "stylegan2", "paper256", "cifar", "cpu64", "bench64", "tiny"]
GanPrecision = Literal["fp32", "auto"]
NoiseMode = Literal["random", "const", "none"]
GenerateSnapshot = Literal["best", "final"]
DicomWindow = Literal["lung", "header"]
# The validate suite's checks (ctsynth.validation.suite), and those the synthetic stage adds: the
# names `fail_on` may list (a misspelt one would otherwise only ever warn).
SuiteCheck = Literal["readable", "complete", "labels", "size", "mode", "class_counts", "leakage_exact", "leakage_near",
                     "duplicates_within_split", "blank"]
SyntheticCheck = Literal[SuiteCheck, "exact_copies", "memorisation", "kid"]

BACKBONES: tuple[str, ...] = get_args(Backbone)
HEADS: tuple[str, ...] = get_args(Head)
ARMS: tuple[str, ...] = get_args(Arm)
CLASSIC_OPS: tuple[str, ...] = get_args(ClassicOp)
EXECUTORS: tuple[str, ...] = get_args(Executor)
METRICS: tuple[str, ...] = get_args(Metric)
GAN_PRESETS: tuple[str, ...] = get_args(GanPreset)
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)
SUITE_CHECKS: tuple[str, ...] = get_args(SuiteCheck)
SYNTHETIC_CHECKS: tuple[str, ...] = get_args(SyntheticCheck)
GENERATE_SNAPSHOTS: tuple[str, ...] = get_args(GenerateSnapshot)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Kaggle "Chest CT-Scan images" folder names start with these prefixes (train/valid add the TNM
# stage after an underscore, test does not). Listing a class here does not make it part of the
# study: only `DataParams.classes` does.
DEFAULT_CLASS_ALIASES: dict[str, list[str]] = {
    "normal": ["normal"],
    "squamous": ["squamous.cell.carcinoma"],
    "adenocarcinoma": ["adenocarcinoma"],
    "large_cell": ["large.cell.carcinoma"],
}


class DataParams(Section):
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    resolution: int = Field(64, ge=8, le=1024)
    classes: list[str] = ["normal", "squamous"]
    class_aliases: dict[str, list[str]] = DEFAULT_CLASS_ALIASES
    splits: list[str] = ["train", "valid", "test"]
    phantom_seed: int = 0
    # DICOM intensity: "lung" = CT in the lung window; "header" = the file's own WindowCenter/Width.
    dicom_window: DicomWindow = "lung"
    # prepare's output folder outside the repository only when set (never inside the raw data);
    # `ctsynth prepare --allow-outside-repo` sets it.
    allow_outside_repo: bool = False

    @model_validator(mode="after")
    def _classes_have_aliases(self) -> "DataParams":
        missing = [c for c in self.classes if c not in self.class_aliases]
        if missing:
            raise ValueError(f"data.classes {missing} have no entry in data.class_aliases")
        return self


class ValidateParams(Section):
    report: str = "reports/validation"
    min_side: int = 16
    max_side: int = 4096
    allowed_modes: list[str] = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "DICOM"]
    # Per split, per class: [min, max] image count.
    class_count_bounds: dict[str, list[int]] = {
        "train": [50, 5000],
        "valid": [5, 2000],
        "test": [10, 2000],
    }
    # Near duplicates: pHash within this many bits picks candidates, and the prepared images'
    # pixel correlation must reach near_duplicate_min_correlation (chest slices share one layout,
    # so distinct slices can have almost equal pHashes).
    near_duplicate_max_hamming: int = Field(4, ge=0, le=64)
    near_duplicate_min_correlation: float = Field(0.98, ge=0.0, le=1.0)
    blank_max_std: float = 0.01
    # Checks named here fail the stage; every other check only warns.
    fail_on: list[SuiteCheck] = [
        "readable",
        "complete",
        "labels",
        "size",
        "mode",
        "class_counts",
        "leakage_exact",
        "leakage_near",
        "blank",
    ]


class ClassifierParams(Section):
    """One classifier training run (`train_classifier` stage). docs/study.md."""

    backbone: Backbone = "smallcnn"
    weights: str = "none"  # imagenet (torchvision's local cache) | none | a file path
    freeze_backbone: bool = False  # frozen: features cached once per image, only the head trains
    head: Head = "linear"
    head_hidden: int = Field(256, ge=2)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    resolution: int = Field(64, ge=16, le=1024)  # model input side; PNGs go through preprocess_bytes
    batch_size: int = Field(32, ge=1)
    optimizer: Optimizer = "adam"
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(20, ge=1)  # at most; early stopping on validation ends sooner
    patience: int = Field(8, ge=1)  # epochs without a better validation score before stopping
    monitor: Monitor = "valid_loss"
    augment: bool = True  # random shift up to max_shift px (not applied to cached features)
    max_shift: int = Field(4, ge=0)
    inference_precision: InferencePrecision = "auto"  # auto (bf16 where the CPU has it and the check passes) | bf16 | fp32
    bf16_prob_tolerance: float = Field(0.02, gt=0)  # max |p_bf16 - p_fp32| on validation, and no label change
    bf16_feature_tolerance: float = Field(0.05, gt=0)  # max relative L2 feature error on validation
    feature_cache: str = ".cache/features"
    # Where the model, its batches and the frozen-feature extraction run (ctsynth.device:
    # auto = CUDA when available, else CPU).
    device: DeviceSetting = "auto"


class SweepRayParams(Section):
    """Resources of one sweep item as a Ray task (sweep.executor: ray)."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)


class SweepParams(Section):
    """The study's sweep: every arm x ratio x seed is one item (docs/study.md)."""

    ratios: list[float] = [0.0, 0.5, 1.0]
    seeds: list[int] = [0, 1, 2, 3, 4]
    # synthetic | duplicate | classic | oracle (at every ratio > 0) | synthetic_only (ratio 1 only);
    # ratio 0 is one real-only baseline shared by all arms.
    arms: list[Arm] = list(ARMS)
    classic_augmentation: list[ClassicOp] = ["rotate", "scale", "intensity", "elastic"]  # + hflip
    # oracle: new genuine images. phantom: drawn from the phantom simulator with oracle_seed (the
    # embedded data only); holdout: a held-out oracle_holdout_fraction of the real train split.
    oracle: str = "data/oracle"
    oracle_source: OracleSource = "phantom"
    oracle_seed: int = 1
    oracle_holdout_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    synthetic: str = "data/synthetic"
    metrics_dir: str = "metrics/sweep"
    runs_dir: str = "models/classifier/runs"
    # local: a pool of worker processes on this machine; ray: one Ray task per item on $RAY_ADDRESS.
    executor: Executor = "local"
    workers: int = Field(0, ge=0)  # local: processes; 0 = the usable CPU cores // threads_per_item
    threads_per_item: int = Field(1, ge=1)  # local: torch threads in each worker
    retries: int = Field(1, ge=0)  # a failed item (or one whose worker died) runs again this often
    ray: SweepRayParams = SweepRayParams()

    @model_validator(mode="after")
    def _sane_lists(self) -> "SweepParams":
        if not self.ratios or any(r < 0 for r in self.ratios):
            raise ValueError(f"sweep.ratios must be a non-empty list of numbers >= 0, got {self.ratios}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep.seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"sweep.arms must be distinct names out of {list(ARMS)}, got {self.arms}")
        return self


class SelectParams(Section):
    """`select` stage: statistics over the sweep, champion choice (on VALIDATION), export, registry."""

    metric: Metric = "balanced_accuracy"  # validation metric that picks the (arm, ratio) (mean over seeds) and the run
    tie_breaker: Metric = "roc_auc"
    baseline_ratio: float = 0.0
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    # The study's statistics (docs/study.md): the test metric the arms are compared on, bootstrap
    # replicates (over seeds and test images), the family-wise error rate (Holm) and the power the
    # minimum detectable effect is stated for.
    compare_metric: Metric = "balanced_accuracy"
    bootstrap: int = Field(2000, ge=100)
    alpha: float = Field(0.05, gt=0.0, lt=0.5)
    power: float = Field(0.8, gt=0.5, lt=1.0)
    bootstrap_seed: int = 0
    # better: @champion moves only when the candidate beats the current champion on the same
    # validation images; always: every select moves it (the reason is recorded either way).
    promote: PromotePolicy = "better"
    report: str = "reports/sweep.csv"
    summary: str = "metrics/summary.json"
    plot: str = "plots/ratio_vs_metric.png"
    plot_data: str = "plots/ratio_vs_metric.csv"
    signal_plot: str = "plots/class_signal.png"  # GAN-test and train-synthetic-test-real
    details: str = "reports/study.json"  # everything summary.json (flat DVC metrics) leaves out
    onnx: str = "models/classifier/model.onnx"
    parity_tolerance: float = Field(1e-4, gt=0)
    register_champion: bool = True


class SyntheticParams(Section):
    """`validate_synthetic`: GX checks on the synthetic manifest + quality and memorisation metrics."""

    synthetic: str = "data/synthetic"
    report: str = "reports/synthetic"
    # Offline feature space (see ctsynth.metrics.features): PCA of the images at `pca_resolution`
    # px with `pca_components` components + 9 intensity statistics.
    feature_space: Literal["pixel_pca"] = "pixel_pca"
    pca_components: int = Field(24, ge=1, le=1024)
    pca_resolution: int = Field(32, ge=4, le=256)
    # Inception-v3 FID only from a weights file on disk (this path, else torch hub's checkpoints
    # folder); never downloaded. Null in metrics.json when absent.
    inception_weights: str | None = None
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    pr_k: int = Field(3, ge=1)
    seed: int = 0
    # Memorisation: distances are RMS pixel differences on the [-1, 1] scale.
    copy_tolerance: float = Field(0.01, ge=0.0)
    memorisation_percentile: Literal["p1", "p5"] = "p1"
    memorisation_max_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # KID check: fails (when listed in fail_on) if synthetic KID > kid_max_ratio x the real floor.
    kid_max_ratio: float = Field(10.0, gt=0.0)
    nearest_neighbour_rows: int = Field(8, ge=1, le=64)
    # Where the Inception features run (ctsynth.device: auto = CUDA when available, else CPU).
    device: DeviceSetting = "auto"
    # The suite's class_counts check on the synthetic set: at least this many images per class.
    min_per_class: int = Field(1, ge=0)
    # These checks fail the stage; the rest only warn. Names are the validate suite's checks
    # (applied to the synthetic manifest) plus exact_copies, memorisation and kid.
    fail_on: list[SyntheticCheck] = [
        "readable", "labels", "size", "mode", "class_counts", "blank", "leakage_exact", "exact_copies", "memorisation",
    ]


class GanParams(Section):
    """`train_gan`: a preset from ctsynth.gan.presets, then any GANConfig field in `overrides`."""

    preset: GanPreset = "cpu64"
    resolution: int | None = None  # None: data.resolution
    per_class: bool = False  # False: one conditional model; True: one model per class (the study's way)
    kimg: float = Field(16.0, gt=0)
    snap: float = Field(2.0, gt=0)
    snap_keep: int = Field(3, ge=1)
    tick_kimg: float = Field(0.25, gt=0)
    overrides: dict[str, Any] = {}
    out: str = "models/gan"
    report: str = "reports/gan"
    init_from: str | None = None  # transfer: another run's snapshot-*.pt (weights only; counters and p reset)
    freeze_d: int = Field(0, ge=0)  # Freeze-D: keep the first k (highest-resolution) D blocks fixed
    snapshot_kid: bool = True  # KID (pixel-PCA feature space) with its real floor at every snapshot
    allow_tf32: bool = False  # TF32 on Ampere+ GPUs (faster, less precise); recorded in MLflow
    # fp32, or auto: time a short fp32 and bf16 step on this machine at start-up (cached per machine,
    # ctsynth.gan.precision) and train in bf16 only where it is faster and passes the parity check
    precision: GanPrecision = "fp32"
    allow_outside_repo: bool = False  # out/report outside the repository only when set


class GenerateParams(Section):
    """`generate`: N images per class from the final G_ema, seeded."""

    per_class: int = Field(200, ge=1)  # the sweep's largest ratio x real train images per class
    seed: int = 0
    psi: float = Field(1.0, ge=0.0, le=2.0)
    out_resolution: int | None = None  # None: data.resolution (the reference study resized 256 -> 224)
    noise_mode: NoiseMode = "const"
    batch: int = Field(32, ge=1)
    out: str = "data/synthetic"
    snapshot: GenerateSnapshot = "final"  # best: the snapshot with the lowest recorded KID
    allow_outside_repo: bool = False
    # Where G_ema runs (ctsynth.device: auto = CUDA when available, else CPU).
    device: DeviceSetting = "auto"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    classifier: ClassifierParams = ClassifierParams()
    sweep: SweepParams = SweepParams()
    select: SelectParams = SelectParams()
    synthetic: SyntheticParams = SyntheticParams()
    gan: GanParams = GanParams()
    generate: GenerateParams = GenerateParams()

    @property
    def validation(self) -> ValidateParams:
        return self.validate_


def read_params_dict(path: str | Path | None = None) -> dict[str, Any]:
    """The params file as a dict: `path`, else the repository's params.yaml.

    A missing file is an error wherever there is a dvc.yaml: DVC records params.yaml's values with
    every result, so running on silent defaults would file results under settings nobody wrote
    down. Outside a DVC repository (no dvc.yaml, no path given) the defaults apply; they equal the
    shipped params.yaml.
    """
    if path:
        params_path = Path(path)
        if not params_path.is_file():
            raise FileNotFoundError(f"params file {params_path} does not exist")
    else:
        root = repo_root()
        params_path = root / DEFAULT_PARAMS_FILE
        if not params_path.is_file():
            if (root / "dvc.yaml").exists():
                raise FileNotFoundError(f"{params_path} does not exist: every stage in {root / 'dvc.yaml'} reads it")
            return {}
    with open(params_path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def load_params(path: str | Path | None = None) -> Params:
    """Load and validate params.yaml (the repository's, unless a path is given)."""
    return Params.model_validate(read_params_dict(path))


def with_overrides(params: Params, **sections: dict[str, Any]) -> Params:
    """`params` with some keys of some sections replaced (`validation=` names the validate
    section), validated as if params.yaml said so. A None value leaves its key as it was: that is
    how a command-line option that was not given keeps the params value."""
    values = params.model_dump(by_alias=True)
    for section, updates in sections.items():
        key = "validate" if section == "validation" else section
        values[key] = values[key] | {name: value for name, value in updates.items() if value is not None}
    return Params.model_validate(values)
