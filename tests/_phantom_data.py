"""Small phantom data sets for the data tests: a few images per class, the real layout."""

from __future__ import annotations

import shutil
from pathlib import Path

from ctsynth.config import DataParams, ValidateParams
from ctsynth.data.phantom import write_phantom_dataset

SMALL_COUNTS = {"train": {"normal": 4, "squamous": 4}, "valid": {"normal": 2, "squamous": 2}, "test": {"normal": 2, "squamous": 3}}
RESOLUTION = 32


def data_params(**update) -> DataParams:
    return DataParams(resolution=RESOLUTION, **update)


def validate_params(**update) -> ValidateParams:
    update.setdefault("class_count_bounds", {"train": [2, 100], "valid": [1, 100], "test": [1, 100]})
    return ValidateParams(**update)


def small_raw(folder: Path, seed: int = 0) -> Path:
    write_phantom_dataset(folder, seed=seed, workers=1, counts=SMALL_COUNTS)
    return folder


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
