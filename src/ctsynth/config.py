"""Typed configuration: params.yaml is read here and nowhere else.

Each DVC stage owns one top-level section of params.yaml (as in iterative/example-get-started),
and each section is a pydantic model below. Unknown keys are errors, so a typo in params.yaml or
in ``dvc exp run -S`` fails loudly instead of silently running the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ctsynth.paths import repo_root

DEFAULT_PARAMS_FILE = "params.yaml"


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
    near_duplicate_max_hamming: int = Field(4, ge=0, le=64)
    blank_max_std: float = 0.01
    # Checks named here fail the stage; every other check only warns.
    fail_on: list[str] = [
        "readable",
        "labels",
        "size",
        "mode",
        "class_counts",
        "leakage_exact",
        "leakage_near",
        "blank",
    ]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")

    @property
    def validation(self) -> ValidateParams:
        return self.validate_


def read_params_dict(path: str | Path | None = None) -> dict[str, Any]:
    params_path = Path(path) if path else repo_root() / DEFAULT_PARAMS_FILE
    if not params_path.exists():
        return {}
    with open(params_path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def load_params(path: str | Path | None = None) -> Params:
    """Load and validate params.yaml (the repository's, unless a path is given)."""
    return Params.model_validate(read_params_dict(path))
