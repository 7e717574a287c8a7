"""`prepare`: raw data in the Kaggle layout -> square grey PNGs + manifest.csv.

    raw/{train,valid,test}/<kaggle class folder>/<any file>
      -> out/{split}/{class}/<stem>.png   (decode_image + square_resize, THE preprocessing path)
      -> out/manifest.csv                 (one row per source file, see data/manifest.py)

A Kaggle folder name maps to a class when its part before the first "_" is one of that class's
aliases (`data.class_aliases`): `squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa` and
`squamous.cell.carcinoma` are both `squamous`. Classes that have aliases but are not in
`data.classes` are skipped. Files that cannot be decoded and folders that map to no class are
NOT fatal here: they become manifest rows (status unreadable / unknown_class) that `validate`
fails on, naming each file. Only a missing raw or split folder is fatal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ctsynth.config import DataParams
from ctsynth.data.manifest import (
    MANIFEST_NAME,
    STATUS_OK,
    STATUS_UNKNOWN_CLASS,
    STATUS_UNREADABLE,
    phash,
    read_manifest,
    sha256_bytes,
    write_manifest,
)
from ctsynth.data.preprocess import ImageDecodeError, decode_image, square_resize

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    ok: bool
    manifest_path: Path | None = None
    errors: list[str] = field(default_factory=list)  # fatal problems
    rows: list[dict] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> prepared images
    unreadable: list[str] = field(default_factory=list)
    unknown_class: list[str] = field(default_factory=list)


def folder_class(folder_name: str, data_params: DataParams) -> str | None:
    """The class a Kaggle folder belongs to (whether or not it is in the study), or None."""
    prefix = folder_name.split("_", 1)[0]
    for class_name, aliases in data_params.class_aliases.items():
        if prefix in aliases:
            return class_name
    return None


def _known_folder_names(data_params: DataParams) -> str:
    return ", ".join(sorted(alias for c in data_params.classes for alias in data_params.class_aliases[c]))


def _unique_name(stem: str, sha: str, taken: set[str]) -> str:
    name = f"{stem}.png"
    if name in taken:  # e.g. "10.png" and "10.jpg", or two folders mapped onto one class
        name = f"{stem}-{sha[:10]}.png"
    taken.add(name)
    return name


def _row(split: str, source_rel: str, **values) -> dict:
    row = dict(path="", split=split, label="", label_id=-1, source_path=source_rel, status=STATUS_OK, error="",
               width="", height="", mode="", sha256="", phash="", mean=np.nan, std=np.nan)
    row.update(values)
    return row


def _prepare_file(source: Path, raw: Path, out: Path, split: str, label: str, data_params: DataParams, taken: set[str]) -> dict:
    source_rel = source.relative_to(raw).as_posix()
    data = source.read_bytes()
    sha = sha256_bytes(data)
    label_id = data_params.classes.index(label)
    try:
        decoded = decode_image(data)
    except ImageDecodeError as exc:
        log.warning("unreadable: %s: %s", source_rel, exc)
        return _row(split, source_rel, label=label, label_id=label_id, status=STATUS_UNREADABLE, error=str(exc), sha256=sha)
    pixels = square_resize(decoded.pixels, data_params.resolution)
    name = _unique_name(source.stem, sha, taken)
    target = out / split / label / name
    # Plain PNG writer settings: same pixels -> same bytes.
    Image.fromarray(pixels, mode="L").save(target, format="PNG", compress_level=6)
    # Intensity of the image content, before the black padding: a constant image keeps std 0.
    intensity = decoded.pixels.astype(np.float64)
    return _row(split, source_rel, path=target.relative_to(out).as_posix(), label=label, label_id=label_id,
                width=decoded.width, height=decoded.height, mode=decoded.mode, sha256=sha, phash=phash(pixels),
                mean=float(intensity.mean()), std=float(intensity.std()))


class UnsafeOutputError(ValueError):
    """The output folder is one `prepare` must not write into (or clear)."""


def check_output_folder(raw: Path, out: Path, repository: Path | None = None) -> None:
    """Refuse an output that is, contains or lies inside the raw data, or (when `repository` is
    given) lies outside that repository; clearing it could destroy data this stage does not own."""
    raw_abs, out_abs = raw.resolve(), out.resolve()
    if out_abs == raw_abs or raw_abs.is_relative_to(out_abs) or out_abs.is_relative_to(raw_abs):
        raise UnsafeOutputError(f"output folder {out} is, contains or lies inside the raw data {raw}: choose another folder (data.prepared)")
    if repository is not None and not out_abs.is_relative_to(repository.resolve()):
        raise UnsafeOutputError(f"output folder {out} lies outside the repository {repository}; "
                                "pass --allow-outside-repo (CLI) if that is intended")


def remove_previous_output(out: Path) -> list[Path]:
    """Delete what an earlier `prepare` wrote into `out` (the PNGs its manifest.csv lists, and the
    manifest) and the folders that leaves empty; nothing else. Refuses, deleting nothing, when
    `out` holds files no manifest accounts for. Returns the files removed."""
    if not out.exists():
        return []
    # Absolute, normalised, symlinks NOT followed: a file DVC linked from its cache is unlinked
    # here, never its target in the cache.
    def absolute(path: Path) -> Path:
        return Path(os.path.abspath(path))

    out_abs = absolute(out)
    listed: set[Path] = set()
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        previous = read_manifest(manifest)
        for rel in previous.loc[previous["status"] == STATUS_OK, "path"]:
            target = absolute(out / rel)
            if not target.is_relative_to(out_abs):  # a manifest row must never reach outside out
                raise UnsafeOutputError(f"{manifest} lists {rel!r}, which is outside {out}: not deleting anything")
            listed.add(target)
        listed.add(absolute(manifest))
    present = {absolute(f) for f in out.rglob("*") if f.is_file() or f.is_symlink()}
    foreign = sorted(present - listed)
    if foreign:
        shown = ", ".join(str(f.relative_to(out_abs)) for f in foreign[:5])
        raise UnsafeOutputError(f"output folder {out} holds {len(foreign)} file(s) that no earlier `prepare` wrote "
                                f"(e.g. {shown}): move them away or choose an empty folder; nothing was deleted")
    removed = sorted(present & listed)
    for file in removed:
        file.unlink()
    for folder in sorted((d for d in out.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def prepare_dataset(raw: Path, out: Path, data_params: DataParams, repository: Path | None = None) -> PrepareResult:
    """Decode, map classes, pad/resize every raw file; write PNGs and manifest.csv into `out`.

    `out` must not be (inside) the raw data and, when `repository` is given, must lie inside it;
    what an earlier run wrote there is replaced, anything else there stops the stage unharmed.
    """
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        message = f"raw data folder {raw} does not exist (make it with `ctsynth phantom --out {raw}` or put the Kaggle set there)"
        log.error(message)
        return PrepareResult(ok=False, errors=[message])
    missing = [s for s in data_params.splits if not (raw / s).is_dir()]
    if missing:
        present = sorted(p.name for p in raw.iterdir() if p.is_dir())
        message = f"raw data folder {raw} lacks split folder(s) {missing}; found {present}"
        log.error(message)
        return PrepareResult(ok=False, errors=[message])

    # Start from an empty output so no stale PNG from an earlier run survives, deleting only
    # what that run wrote.
    try:
        check_output_folder(raw, out, repository)
        removed = remove_previous_output(out)
    except (UnsafeOutputError, ValueError) as exc:
        log.error("%s", exc)
        return PrepareResult(ok=False, errors=[str(exc)])
    if removed:
        log.info("removed %d files of the previous prepare run in %s", len(removed), out)
    out.mkdir(parents=True, exist_ok=True)

    result = PrepareResult(ok=True)
    jobs: list[tuple[Path, str, str]] = []
    for split in data_params.splits:
        result.counts[split] = {c: 0 for c in data_params.classes}
        for entry in sorted((raw / split).iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                message = f"file directly in the split folder, not in a class folder; known class folder names: {_known_folder_names(data_params)}"
                result.rows.append(_row(split, entry.relative_to(raw).as_posix(), status=STATUS_UNKNOWN_CLASS, error=message))
                continue
            class_name = folder_class(entry.name, data_params)
            if class_name is not None and class_name not in data_params.classes:
                log.info("skipping %s/%s: class %r is not in data.classes %s", split, entry.name, class_name, data_params.classes)
                continue
            files = sorted(f for f in entry.rglob("*") if f.is_file() and not f.name.startswith("."))
            if class_name is None:
                message = (f"folder {split}/{entry.name!r} maps to no class: its name before the first '_' must be one of "
                           f"{_known_folder_names(data_params)} (data.class_aliases)")
                log.error(message)
                for f in files:
                    result.rows.append(_row(split, f.relative_to(raw).as_posix(), status=STATUS_UNKNOWN_CLASS, error=message,
                                            sha256=sha256_bytes(f.read_bytes())))
                continue
            (out / split / class_name).mkdir(parents=True, exist_ok=True)
            jobs.extend((f, split, class_name) for f in files)

    taken_by_folder: dict[tuple[str, str], set[str]] = {}
    for source, split, label in tqdm(jobs, desc="prepare", unit="img", disable=None):
        taken = taken_by_folder.setdefault((split, label), set())
        row = _prepare_file(source, raw, out, split, label, data_params, taken)
        result.rows.append(row)
        if row["status"] == STATUS_OK:
            result.counts[split][label] += 1
    result.unreadable = [r["source_path"] for r in result.rows if r["status"] == STATUS_UNREADABLE]
    result.unknown_class = [r["source_path"] for r in result.rows if r["status"] == STATUS_UNKNOWN_CLASS]
    result.manifest_path = write_manifest(result.rows, out)
    log.info("prepared %s into %s (resolution %d); %d unreadable, %d in unknown folders",
             result.counts, out, data_params.resolution, len(result.unreadable), len(result.unknown_class))
    return result
