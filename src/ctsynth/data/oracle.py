"""The `oracle` arm's pool of NEW genuine training images (the study's positive control).

It measures what perfect synthetic images would give: if adding real images the classifier has
never seen does not beat adding duplicates, no generator can, and the study cannot detect a gain.

    phantom  (the embedded data) new slices from the phantom simulator with sweep.oracle_seed
             (the data set uses data.phantom_seed; a slice's random stream is keyed by seed, split,
             class and index, so no slice repeats one of the data set), written in the Kaggle layout
             and then passed through the SAME `prepare` path (ctsynth.data.ingest.prepare_dataset,
             i.e. the one preprocessing) as the data set itself.
    holdout  (a real data set) a seeded share sweep.oracle_holdout_fraction of each class's real
             train images is held out; ctsynth.data.mixing.load_arm_data removes them from the
             training split of every arm, the baseline included. The baseline then trains on fewer
             real images (the oracle's headroom is measured from that smaller baseline).

Output: <sweep.oracle>/train/<class>/*.png and manifest.csv (the prepared layout; holdout rows name
the prepared image they copy in `holdout_of`). Only files this stage wrote are removed on a rerun.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ctsynth.paths import resolve
from ctsynth.config import Params
from ctsynth.data.ingest import prepare_dataset
from ctsynth.data.mixing import class_seed, real_split, synthetic_count

log = logging.getLogger(__name__)

MARKER = ".ctsynth-oracle"  # a folder holding this file was written by this stage


def oracle_counts(params: Params, real_train_counts: dict[str, int]) -> dict[str, int]:
    """Images per class the largest ratio needs (0 when the oracle arm is not in sweep.arms)."""
    if "oracle" not in params.sweep.arms:
        return {c: 0 for c in real_train_counts}
    top = max(params.sweep.ratios)
    return {c: synthetic_count(top, n) for c, n in real_train_counts.items()}


def _clear(out: Path) -> None:
    """Empty `out` only if this stage made it (its marker is there); refuse anything else."""
    if out.exists():
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and was not written by the oracle stage (no {MARKER}); move it or set sweep.oracle elsewhere")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by the ctsynth oracle stage; removed and rewritten on each run\n")


def build_oracle(params: Params, root: Path, workers: int = 2) -> Path:
    """Write the oracle pool for params.sweep.oracle_source; returns its manifest path."""
    classes = params.data.classes
    prepared = resolve(params.data.prepared, root)
    out = resolve(params.sweep.oracle, root)
    real_train = real_split(prepared, "train", classes)
    counts = oracle_counts(params, {c: sum(item.label == c for item in real_train) for c in classes})
    _clear(out)
    manifest = out / "manifest.csv"
    if params.sweep.oracle_source == "phantom":
        from ctsynth.data.phantom import CLASSES as PHANTOM_CLASSES
        from ctsynth.data.phantom import write_phantom_dataset

        if params.sweep.oracle_seed == params.data.phantom_seed:
            raise ValueError(f"sweep.oracle_seed ({params.sweep.oracle_seed}) must differ from data.phantom_seed: the oracle needs new images")
        unknown = [c for c in classes if counts[c] and c not in PHANTOM_CLASSES]
        if unknown:
            raise ValueError(f"the phantom simulates {list(PHANTOM_CLASSES)} only, not {unknown}; use sweep.oracle_source: holdout")
        with tempfile.TemporaryDirectory(prefix="ctsynth-oracle-") as tmp:
            raw, prepared_tmp = Path(tmp) / "raw", Path(tmp) / "prepared"
            write_phantom_dataset(raw, seed=params.sweep.oracle_seed, workers=workers, counts={"train": {c: counts[c] for c in classes}})
            data = params.data.model_copy(update={"splits": ["train"]})
            # prepared beside the raw slices, then copied in: `prepare` writes only into folders it owns
            result = prepare_dataset(raw, prepared_tmp, data)
            if not result.ok:
                raise RuntimeError(f"preparing the oracle's phantom images failed: {result.errors}")
            shutil.copytree(prepared_tmp, out, dirs_exist_ok=True)
        log.info("oracle pool: %s new phantom images (seed %d) in %s", counts, params.sweep.oracle_seed, out)
        return manifest
    # holdout: copy a seeded share of each class's prepared train images
    rows = []
    for c in classes:
        real_c = [item for item in real_train if item.label == c]
        k = synthetic_count(params.sweep.oracle_holdout_fraction, len(real_c))
        # the arms then train on the n - k images left, so the largest ratio needs ratio x (n - k)
        needed = oracle_counts(params, {c: len(real_c) - k})[c]
        if needed > k:
            raise ValueError(f"the largest ratio needs {needed} oracle '{c}' images but the holdout has {k}; raise sweep.oracle_holdout_fraction")
        order = np.random.default_rng(class_seed(params.sweep.oracle_seed, c, "oracle-holdout")).permutation(len(real_c))[:k]
        (out / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in sorted(order):
            item = real_c[i]
            source = item.path.relative_to(prepared).as_posix()
            target = Path("train") / c / item.path.name
            shutil.copyfile(item.path, out / target)
            rows.append({"path": target.as_posix(), "split": "train", "label": c, "label_id": item.label_id, "status": "ok", "holdout_of": source})
    pd.DataFrame(rows, columns=["path", "split", "label", "label_id", "status", "holdout_of"]).to_csv(manifest, index=False)
    log.info("oracle pool: %d held-out real train images in %s (they leave every arm's training split)", len(rows), out)
    return manifest
