"""Exact and near duplicates, across splits (leakage) and within a split.

Exact: the same source bytes (sha256). Near: perceptual hashes within `max_hamming` bits (a
re-encoded, resized or slightly edited copy). Each function returns a frame with one row per
file, which the Great Expectations suite then checks column by column, so the offending
files come out of GX's own unexpected-row report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctsynth.data.manifest import pairwise_hamming, phash_to_uint64

NO_MATCH_DISTANCE = 64  # a 64-bit hash can differ in at most 64 bits


def exact_cross_split(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per (sha256, split); a sha256 that appears twice is shared by two splits."""
    rows = manifest[manifest["sha256"].astype(str) != ""]
    if rows.empty:
        return pd.DataFrame(columns=["sha256", "split", "files", "n_splits"])
    grouped = rows.groupby(["sha256", "split"], sort=True)["source_path"].apply(lambda s: ", ".join(sorted(s))).reset_index()
    grouped = grouped.rename(columns={"source_path": "files"})
    grouped["n_splits"] = grouped.groupby("sha256")["split"].transform("count")
    # `files` names every copy, in every split, so the message can say "X is also Y".
    everywhere = grouped.groupby("sha256")["files"].apply(lambda s: " == ".join(s))
    grouped["files"] = grouped["sha256"].map(everywhere)
    return grouped


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float(np.array_equal(a, b))


def nearest_neighbours(manifest: pd.DataFrame, pixels: np.ndarray | None, max_hamming: int) -> pd.DataFrame:
    """For every hashed file: its most similar near copy in another split and in its own split.

    Two steps, because chest slices share one layout and their 64-bit pHashes crowd together
    (distinct phantom slices can differ by 0-2 bits): the hash picks candidates within
    `max_hamming` bits, then the pixel correlation of the prepared images (`pixels`, aligned
    with the manifest's hashed rows) says whether a candidate really is a copy. Without
    pixels, every candidate counts (correlation 1). Exact copies (same sha256) are left out:
    the exact checks report them once.
    """
    rows = manifest[manifest["phash"].astype(str) != ""].reset_index(drop=True)
    frame = pd.DataFrame({"source_path": rows["source_path"].astype(str), "split": rows["split"].astype(str)})
    n = len(rows)
    hashes = phash_to_uint64(rows["phash"])
    distance = pairwise_hamming(hashes, hashes).astype(np.int32) if n else np.zeros((0, 0), np.int32)
    split = rows["split"].to_numpy()
    sha = rows["sha256"].astype(str).to_numpy()
    same_split = split[:, None] == split[None, :]
    same_bytes = sha[:, None] == sha[None, :]
    names = frame["source_path"].to_numpy()
    for column, mask in (("other_split", ~same_split & ~same_bytes), ("same_split", same_split & ~same_bytes)):
        correlation = np.zeros(n)
        hamming = np.full(n, NO_MATCH_DISTANCE)
        match = np.full(n, "", dtype=object)
        for i, j in zip(*np.nonzero(mask & (distance <= max_hamming))):
            value = 1.0 if pixels is None else _correlation(pixels[i], pixels[j])
            if value > correlation[i]:
                correlation[i], hamming[i], match[i] = value, distance[i, j], names[j]
        frame[f"{column}_correlation"] = correlation
        frame[f"{column}_hamming"] = hamming
        frame[f"{column}_match"] = match
    return frame


def exact_within_split(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows with a sha256 that another file of the same split also has."""
    rows = manifest[manifest["sha256"].astype(str) != ""]
    counts = rows.groupby(["split", "sha256"])["source_path"].transform("count")
    frame = rows[["source_path", "split", "sha256"]].copy()
    frame["copies_in_split"] = counts
    return frame
