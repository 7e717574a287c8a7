"""Every params file we ship loads, and holds every key dvc.yaml names (DVC does not read pydantic
defaults: a key missing from the file stops `dvc repro` with 'Parameters ... are missing')."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctsynth.config import load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILES = ["params.yaml", "params/reference-study.yaml", "tests/e2e/params_tiny.yaml"]


def dvc_param_keys() -> list[tuple[str, str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return [(name, key) for name, stage in stages.items() for key in stage.get("params", []) if isinstance(key, str)]


def has_key(values: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


@pytest.mark.parametrize("name", PARAMS_FILES)
def test_params_file_loads_and_has_every_dvc_param(name):
    path = REPO / name
    load_params(path)  # typed: unknown keys and bad values raise
    values = yaml.safe_load(path.read_text())
    missing = [f"{stage}: {key}" for stage, key in dvc_param_keys() if not has_key(values, key)]
    assert not missing, f"{name} lacks keys dvc.yaml names: {missing}"


def test_reference_study_matches_the_study():
    params = load_params(REPO / "params/reference-study.yaml")
    from ctsynth.gan.presets import make_config

    gan = make_config(params.gan.preset, params.gan.resolution, **params.gan.overrides, kimg=params.gan.kimg)
    assert (params.gan.preset, params.gan.resolution, gan.batch, gan.gamma, gan.kimg, params.gan.per_class) == ("stylegan2", 256, 8, 50, 80, True)
    classifier_variant = yaml.safe_load((REPO / "params/reference-study-classifier.yaml").read_text())["classifier"]
    assert params.classifier.model_dump() == params.classifier.model_copy(update=classifier_variant).model_dump()
    assert (params.classifier.backbone, params.classifier.weights, params.classifier.freeze_backbone, params.classifier.resolution) == ("resnet50", "imagenet", True, 224)
    assert params.sweep.ratios == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert params.generate.per_class >= max(params.sweep.ratios) * 155  # the Kaggle train split's larger class
