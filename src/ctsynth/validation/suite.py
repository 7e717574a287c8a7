"""`validate`: Great Expectations checks over the prepare manifest (and the raw folder).

Each check is one GX expectation suite run over a pandas frame: the manifest itself or a frame
derived from it (per-split class counts, cross-split sha256 groups, nearest-neighbour hashes).
Every frame carries an `item` column that names the file(s) and the reason, and GX is asked
for its unexpected rows by that column, so the offending files come straight from GX.

    check                    frame                               expectation(s)
    readable                 manifest                            status not in {unreadable}
    complete                 raw files + manifest                every raw file in the manifest, unchanged; every prepared PNG exists
    labels                   manifest                            label in data.classes, split in the splits
    size / mode              decoded rows                        width, height in [min_side, max_side]; mode allowed
    class_counts             counts per split x class            count within validate.class_count_bounds[split]
    leakage_exact            one row per (sha256, split)         sha256 unique (no file bytes in two splits)
    leakage_near             nearest other-split neighbour       pHash candidate's pixel correlation below the threshold
    duplicates_within_split  nearest same-split neighbour        no exact or near copy inside a split
    blank                    decoded rows                        std of the prepared image above blank_max_std

Checks listed in `validate.fail_on` fail the stage; the others warn. `run_checks` takes any
manifest (plus an optional reference manifest), so the synthetic images can reuse it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ctsynth.config import DataParams, ValidateParams
from ctsynth.data.manifest import STATUS_OK, STATUS_UNREADABLE, read_manifest, sha256_bytes
from ctsynth.validation.leakage import exact_cross_split, exact_within_split, nearest_neighbours

log = logging.getLogger(__name__)

DATA_DOCS_SITE = "ctsynth_data_docs"
REFERENCE_PREFIX = "reference:"


@dataclass
class CheckResult:
    name: str
    severity: str  # "fail" (listed in validate.fail_on) or "warn"
    success: bool
    description: str
    offending: list[str] = field(default_factory=list)
    n_rows: int = 0

    @property
    def blocking(self) -> bool:
        return self.severity == "fail" and not self.success


@dataclass
class ValidationResult:
    success: bool
    checks: list[CheckResult]
    failures: list[str]  # "check: offending item" for every failed blocking check
    warnings: list[str]
    report: Path | None = None


@dataclass
class _Check:
    name: str
    description: str
    frame: pd.DataFrame
    expectations: list = field(default_factory=list)


def _load_pixels(rows: pd.DataFrame, roots: list[Path]) -> np.ndarray | None:
    """Prepared images of `rows` (float32), looked up under their `root` column's folder."""
    images = []
    for path, root_index in zip(rows["path"], rows["_root"]):
        target = roots[int(root_index)] / str(path)
        if not str(path) or not target.is_file():
            log.warning("near-duplicate check falls back to pHash only: %s is missing", target)
            return None
        images.append(np.asarray(Image.open(target).convert("L"), dtype=np.float32))
    if len({image.shape for image in images}) > 1:
        log.warning("near-duplicate check falls back to pHash only: prepared images differ in size")
        return None
    return np.stack(images) if images else np.zeros((0, 1, 1), np.float32)


def build_checks(
    manifest: pd.DataFrame,
    data_params: DataParams,
    validate_params: ValidateParams,
    image_root: Path | None = None,
    reference: pd.DataFrame | None = None,
    reference_root: Path | None = None,
    raw: Path | None = None,
    splits: list[str] | None = None,
) -> list[_Check]:
    """The frames and expectations of every check (GX objects, not yet run)."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    splits = list(splits or data_params.splits)
    manifest = manifest.copy()
    manifest["source_path"] = manifest["source_path"].astype(str)
    decoded = manifest[manifest["status"] == STATUS_OK].copy()
    checks: list[_Check] = []

    frame = manifest.assign(item=manifest["source_path"] + " — " + manifest["error"].astype(str))
    checks.append(_Check("readable", "every file decodes as PNG, JPEG or DICOM", frame,
                         [gxe.ExpectColumnValuesToNotBeInSet(column="status", value_set=[STATUS_UNREADABLE])]))

    if raw is not None:
        checks.append(_completeness_check(manifest, Path(raw), image_root))

    frame = manifest.assign(item=manifest["source_path"] + " — " + manifest["error"].astype(str).where(manifest["error"].astype(str) != "", "label " + manifest["label"].astype(str)))
    checks.append(_Check("labels", f"every file is in a known class folder ({data_params.classes}) and split ({splits})", frame, [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(data_params.classes)),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=splits),
    ]))

    frame = decoded.assign(item=decoded["source_path"] + " — " + decoded["width"].astype(str) + "x" + decoded["height"].astype(str))
    checks.append(_Check("size", f"width and height within [{validate_params.min_side}, {validate_params.max_side}] px", frame, [
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=validate_params.min_side, max_value=validate_params.max_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=validate_params.min_side, max_value=validate_params.max_side),
    ]))

    frame = decoded.assign(item=decoded["source_path"] + " — mode " + decoded["mode"].astype(str))
    checks.append(_Check("mode", f"image mode one of {validate_params.allowed_modes}", frame,
                         [gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(validate_params.allowed_modes))]))

    counts = decoded.groupby(["split", "label"]).size()
    count_rows = []
    for split in splits:
        for label in data_params.classes:
            bounds = validate_params.class_count_bounds.get(split)
            count = int(counts.get((split, label), 0))
            count_rows.append({"split": split, "label": label, "count": count,
                               "item": f"{split}/{label}: {count} images, bounds {bounds}"})
    frame = pd.DataFrame(count_rows, columns=["split", "label", "count", "item"])
    expectations = [
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=low, max_value=high, row_condition=Column("split") == split)
        for split, (low, high) in validate_params.class_count_bounds.items()
        if split in splits
    ]
    checks.append(_Check("class_counts", "images per split and class within validate.class_count_bounds", frame, expectations))

    # Leakage and duplicates: the manifest, plus the reference set's files when given.
    combined = manifest.assign(_root=0)
    roots = [Path(image_root) if image_root else Path(".")]
    if reference is not None:
        combined = pd.concat([combined, reference.assign(split=REFERENCE_PREFIX + reference["split"].astype(str), _root=1)], ignore_index=True)
        roots.append(Path(reference_root) if reference_root else Path("."))
    own_files = set(manifest["source_path"])

    exact = exact_cross_split(combined)
    own_sha = set(manifest["sha256"].astype(str))
    exact = exact[exact["sha256"].isin(own_sha)].assign(item=lambda f: "same bytes: " + f["files"])
    checks.append(_Check("leakage_exact", "no file's bytes appear in two splits", exact,
                         [gxe.ExpectColumnValuesToBeUnique(column="sha256")]))

    hashed = combined[(combined["status"] == STATUS_OK) & (combined["phash"].astype(str) != "")].reset_index(drop=True)
    pixels = _load_pixels(hashed, roots) if image_root is not None else None
    near = nearest_neighbours(hashed, pixels, validate_params.near_duplicate_max_hamming)
    near = near[near["source_path"].isin(own_files) & ~near["split"].str.startswith(REFERENCE_PREFIX)].copy()
    near["item"] = [
        f"{s}/{p} ~ {m} (pHash {h} bits, correlation {c:.3f})" if m else f"{s}/{p}"
        for s, p, m, h, c in zip(near["split"], near["source_path"], near["other_split_match"], near["other_split_hamming"], near["other_split_correlation"])
    ]
    threshold = validate_params.near_duplicate_min_correlation
    checks.append(_Check("leakage_near", f"no near copy in another split (pHash <= {validate_params.near_duplicate_max_hamming} bits and pixel correlation >= {threshold})", near,
                         [gxe.ExpectColumnValuesToBeBetween(column="other_split_correlation", max_value=threshold, strict_max=True)]))

    within = near.drop(columns=["item"]).merge(exact_within_split(manifest)[["source_path", "copies_in_split"]], on="source_path", how="left")
    within["copies_in_split"] = within["copies_in_split"].fillna(1).astype(int)
    within["item"] = [
        f"{p}: {n} byte-identical copies in {s}" if n > 1 else (f"{p} ~ {m} (pHash {h} bits, correlation {c:.3f})" if m else p)
        for p, s, n, m, h, c in zip(within["source_path"], within["split"], within["copies_in_split"], within["same_split_match"], within["same_split_hamming"], within["same_split_correlation"])
    ]
    checks.append(_Check("duplicates_within_split", "no exact or near copies inside one split", within, [
        gxe.ExpectColumnValuesToBeBetween(column="copies_in_split", max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="same_split_correlation", max_value=threshold, strict_max=True),
    ]))

    frame = decoded.assign(item=decoded["source_path"] + " — std " + decoded["std"].map(lambda v: f"{v:.4f}"))
    checks.append(_Check("blank", f"no blank or constant image (image std > {validate_params.blank_max_std})", frame,
                         [gxe.ExpectColumnValuesToBeBetween(column="std", min_value=validate_params.blank_max_std, strict_min=True)]))
    return checks


def _completeness_check(manifest: pd.DataFrame, raw: Path, image_root: Path | None) -> _Check:
    import great_expectations.expectations as gxe

    by_source = dict(zip(manifest["source_path"], manifest["sha256"].astype(str)))
    rows = []
    for file in sorted(p for p in raw.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(raw).parts)):
        relative = file.relative_to(raw).as_posix()
        recorded = by_source.get(relative)
        rows.append({"item": relative, "in_manifest": recorded is not None,
                     "source_unchanged": recorded is not None and recorded == sha256_bytes(file.read_bytes()), "prepared_exists": True})
    raw_files = {row["item"] for row in rows}
    for source, path, status in zip(manifest["source_path"], manifest["path"].astype(str), manifest["status"]):
        exists = status != STATUS_OK or image_root is None or (Path(image_root) / path).is_file()
        if source not in raw_files or not exists:
            rows.append({"item": f"{source} -> {path}", "in_manifest": True, "source_unchanged": source in raw_files, "prepared_exists": exists})
    frame = pd.DataFrame(rows, columns=["item", "in_manifest", "source_unchanged", "prepared_exists"])
    return _Check("complete", "the manifest lists every raw file with its current sha256, and every prepared PNG exists", frame, [
        gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True]) for column in ("in_manifest", "source_unchanged", "prepared_exists")
    ])


def _gx_context(data_docs_dir: Path | None):
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # One progress bar per expectation is noise in a DVC log.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if data_docs_dir is not None:
        context.add_data_docs_site(site_name=DATA_DOCS_SITE, site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(data_docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return context


def _run_check(context, check: _Check, prefix: str, data_docs: bool) -> tuple[bool, list[str], list[dict]]:
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    name = f"{prefix}{check.name}"
    source = context.data_sources.add_pandas(name=name)
    batch_definition = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=check.expectations))
    validation = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_definition, suite=suite))
    actions = [UpdateDataDocsAction(name="data_docs", site_names=[DATA_DOCS_SITE])] if data_docs else []
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[validation], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["item"]},
    ))
    frame = check.frame.reset_index(drop=True)
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    offending: list[str] = []
    details: list[dict] = []
    for suite_result in result.run_results.values():
        for expectation_result in suite_result.results:
            details.append(expectation_result.to_json_dict())
            if expectation_result.success:
                continue
            if expectation_result.exception_info and expectation_result.exception_info.get("raised_exception"):
                message = expectation_result.exception_info.get("exception_message")
                offending.append(f"(expectation {expectation_result.expectation_config.type} raised: {message})")
            for row in expectation_result.result.get("unexpected_index_list") or []:
                item = row.get("item") if isinstance(row, dict) else str(row)
                if item not in offending:
                    offending.append(item)
    return bool(result.success), offending, details


def run_checks(
    manifest: pd.DataFrame,
    data_params: DataParams,
    validate_params: ValidateParams,
    image_root: Path | None = None,
    reference: pd.DataFrame | None = None,
    reference_root: Path | None = None,
    raw: Path | None = None,
    splits: list[str] | None = None,
    data_docs_dir: Path | None = None,
    suite_prefix: str = "",
) -> tuple[list[CheckResult], dict[str, list[dict]]]:
    """Run every check over `manifest` with GX; returns the check results and GX's raw results.

    `reference` (with `reference_root` for its images) adds files that `manifest`'s files must not
    duplicate, e.g. the real train set when checking synthetic images. `splits` names the splits
    the manifest may use (default data.splits).
    """
    context = _gx_context(data_docs_dir)
    checks = build_checks(manifest, data_params, validate_params, image_root, reference, reference_root, raw, splits)
    results: list[CheckResult] = []
    details: dict[str, list[dict]] = {}
    for check in checks:
        success, offending, check_details = _run_check(context, check, suite_prefix, data_docs_dir is not None)
        severity = "fail" if check.name in validate_params.fail_on else "warn"
        results.append(CheckResult(check.name, severity, success, check.description, offending, len(check.frame)))
        details[check.name] = check_details
    if data_docs_dir is not None:
        context.build_data_docs(site_names=[DATA_DOCS_SITE])
    return results, details


def _summarise(checks: list[CheckResult], counts: dict, report: Path | None) -> ValidationResult:
    failures = [f"{c.name}: {item}" for c in checks if c.blocking for item in (c.offending or ["(no rows named)"])]
    warnings = [f"{c.name}: {item}" for c in checks if not c.success and not c.blocking for item in c.offending]
    success = not any(c.blocking for c in checks)
    for c in checks:
        if c.success:
            log.info("check %-24s passed (%d rows)", c.name, c.n_rows)
        elif c.blocking:
            log.error("check %s FAILED (%s): %d offending:\n  %s", c.name, c.description, len(c.offending), "\n  ".join(c.offending))
        else:
            log.warning("check %s warns (%s): %d offending:\n  %s", c.name, c.description, len(c.offending), "\n  ".join(c.offending))
    if success:
        log.info("validation passed (%d checks, %d warnings)", len(checks), len(warnings))
    else:
        log.error("validation FAILED: %d offending item(s) in blocking checks %s; report in %s",
                  len(failures), [c.name for c in checks if c.blocking], report)
    return ValidationResult(success=success, checks=checks, failures=failures, warnings=warnings, report=report)


SUMMARY_FILE = "summary.json"  # DVC metrics: a few flat numbers to compare across experiments
DETAILS_FILE = "details.json"  # every check with its offending rows and description
RESULTS_FILE = "results.json"  # the checks plus Great Expectations' own result objects


def summary_metrics(result: ValidationResult, counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """The numbers `dvc metrics show/diff` compares: flat keys, numbers only (strings and nested
    detail would become hundreds of columns)."""
    return {
        "success": int(result.success),
        "failed_checks": sum(c.blocking for c in result.checks),
        "warnings": sum(not c.success and not c.blocking for c in result.checks),
        **{f"images_{split}": sum(per_class.values()) for split, per_class in sorted(counts.items())},
    }


def write_report(result: ValidationResult, details: dict, counts: dict, report: Path) -> None:
    detail = {
        "success": result.success,
        "n_failed_checks": sum(c.blocking for c in result.checks),
        "n_warnings": sum(not c.success and not c.blocking for c in result.checks),
        "counts": counts,
        "checks": {
            c.name: {"success": c.success, "severity": c.severity, "description": c.description, "n_rows": c.n_rows,
                     "n_offending": len(c.offending), "offending": c.offending}
            for c in result.checks
        },
    }
    (report / SUMMARY_FILE).write_text(json.dumps(summary_metrics(result, counts), indent=2) + "\n", encoding="utf-8")
    (report / DETAILS_FILE).write_text(json.dumps(detail, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (report / RESULTS_FILE).write_text(json.dumps({"checks": [asdict(c) for c in result.checks], "great_expectations": details},
                                                  indent=1, default=str) + "\n", encoding="utf-8")


def _counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    decoded = manifest[manifest["status"] == STATUS_OK]
    counts: dict[str, dict[str, int]] = {}
    for (split, label), n in decoded.groupby(["split", "label"]).size().items():
        counts.setdefault(str(split), {})[str(label)] = int(n)
    return counts


def validate_manifest(
    manifest: pd.DataFrame,
    report: Path,
    data_params: DataParams,
    validate_params: ValidateParams,
    image_root: Path | None = None,
    reference: pd.DataFrame | None = None,
    reference_root: Path | None = None,
    raw: Path | None = None,
    splits: list[str] | None = None,
) -> ValidationResult:
    """Run the checks over any manifest and write report/summary.json (DVC metrics), details.json,
    results.json and data_docs/."""
    report = Path(report)
    if (report / "data_docs").exists():
        shutil.rmtree(report / "data_docs")  # docs of an earlier run would linger otherwise
    report.mkdir(parents=True, exist_ok=True)
    checks, details = run_checks(manifest, data_params, validate_params, image_root, reference, reference_root,
                                 raw, splits, data_docs_dir=report / "data_docs")
    counts = _counts(manifest)
    result = _summarise(checks, counts, report)
    write_report(result, details, counts, report)
    return result


def validate_dataset(raw: Path, prepared: Path, report: Path, data_params: DataParams, validate_params: ValidateParams) -> ValidationResult:
    """The `validate` stage: the prepare manifest, the raw files and the prepared PNGs."""
    raw, prepared, report = Path(raw), Path(prepared), Path(report)
    manifest = read_manifest(prepared)
    return validate_manifest(manifest, report, data_params, validate_params, image_root=prepared,
                             raw=raw if raw.is_dir() else None)
