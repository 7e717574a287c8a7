"""The manifest: one row per source file, shared by `prepare`, `validate` and later stages.

Also the perceptual hash used to find near duplicates (pHash: the sign pattern of the
lowest 8 x 8 DCT coefficients of a 32 x 32 thumbnail against their median), written with
numpy/scipy so it needs no extra dependency.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn

MANIFEST_NAME = "manifest.csv"
GENERATOR_RECORD = "generator.json"  # in a synthetic folder: which network files made its images
MANIFEST_COLUMNS = [
    "path",  # prepared PNG, relative to the prepared folder ("" when nothing was written)
    "split",
    "label",  # a data.classes entry, "" when the folder maps to no class
    "label_id",  # index into data.classes, -1 when unknown
    "source_path",  # relative to the raw folder
    "status",  # ok | unreadable | unknown_class
    "error",
    "width",
    "height",
    "mode",
    "sha256",  # of the source file's bytes
    "phash",  # 16 hex digits
    "mean",  # intensity of the decoded image in [0, 1], before padding (a constant image has std 0)
    "std",
]
STATUS_OK = "ok"
STATUS_UNREADABLE = "unreadable"
STATUS_UNKNOWN_CLASS = "unknown_class"

_PHASH_THUMB = 32
_PHASH_BLOCK = 8


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def phash(pixels: np.ndarray) -> str:
    """64-bit perceptual hash of a grey image (uint8 or float in [0, 1]) as 16 hex digits."""
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(np.asarray(pixels, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    thumb = Image.fromarray(pixels, mode="L").resize((_PHASH_THUMB, _PHASH_THUMB), Image.Resampling.BOX)
    coefficients = dctn(np.asarray(thumb, dtype=np.float64), type=2, norm="ortho")
    low = coefficients[:_PHASH_BLOCK, :_PHASH_BLOCK].ravel()
    # The DC term only says how bright the image is; leave it out of the median.
    bits = low > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def phash_to_uint64(hashes: pd.Series | list[str]) -> np.ndarray:
    return np.array([int(h, 16) if isinstance(h, str) and h else 0 for h in hashes], dtype=np.uint64)


def hamming(a: str, b: str) -> int:
    return int(bin(int(a, 16) ^ int(b, 16)).count("1"))


def pairwise_hamming(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """len(left) x len(right) matrix of bit differences between uint64 hashes."""
    return np.bitwise_count(left[:, None] ^ right[None, :]).astype(np.int16)


def write_manifest(rows: pd.DataFrame | list[dict], folder: Path) -> Path:
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame = frame[MANIFEST_COLUMNS].sort_values(["split", "source_path"], kind="stable").reset_index(drop=True)
    target = Path(folder) / MANIFEST_NAME
    # Fixed float format: the same images give a byte-identical manifest (DVC hashes it).
    frame.to_csv(target, index=False, float_format="%.6f", lineterminator="\n")
    return target


def read_manifest(folder_or_file: Path) -> pd.DataFrame:
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"no manifest at {path}: run `ctsynth prepare` first")
    frame = pd.read_csv(path, dtype={"phash": str, "sha256": str, "error": str, "path": str, "label": str, "mode": str}, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest {path} lacks columns {missing}")
    # Unreadable rows have empty sizes and intensities: NaN, not strings.
    for column in ("mean", "std", "width", "height", "label_id"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def read_generator_record(synthetic_dir: Path) -> dict | None:
    """A synthetic folder's generator.json (written by `generate`: per class the network file and
    its md5), or None where it has none."""
    import json

    path = Path(synthetic_dir) / GENERATOR_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
