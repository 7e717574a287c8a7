"""Each choice a params key offers is written once, as a Literal in ctsynth.config: the name lists
the code checks against are that Literal's members, and an unknown choice fails when params.yaml
is read, naming the key."""

from __future__ import annotations

import argparse
from typing import get_args

import pydantic
import pytest

from ctsynth import config
from ctsynth.config import ClassifierParams, GanParams, Params, SelectParams, SweepParams


def test_name_lists_are_the_literals_members():
    from ctsynth.classifier.backbones import BACKBONE_NAMES, RESNETS, SMALL_CNN
    from ctsynth.classifier.evaluate import METRIC_NAMES
    from ctsynth.classifier.heads import HEAD_NAMES
    from ctsynth.data.mixing import ARMS, CLASSIC_OPS, SYNTHETIC_ONLY
    from ctsynth.gan.presets import PRESETS

    assert BACKBONE_NAMES == get_args(config.Backbone) and set(RESNETS) | {SMALL_CNN} == set(BACKBONE_NAMES)
    assert HEAD_NAMES == get_args(config.Head)
    assert METRIC_NAMES == get_args(config.Metric)
    assert ARMS == get_args(config.Arm) and SYNTHETIC_ONLY in ARMS
    assert CLASSIC_OPS == get_args(config.ClassicOp)
    assert set(PRESETS) == set(get_args(config.GanPreset)), "a preset in ctsynth.gan.presets that params.yaml cannot name, or the reverse"


def test_the_cli_offers_the_literals_choices():
    from ctsynth.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    choices = {
        (name, action.dest): tuple(action.choices)
        for name, sub in commands.choices.items()
        for action in sub._actions
        if action.choices
    }
    assert choices[("train-classifier", "executor")] == get_args(config.Executor)
    assert choices[("generate", "snapshot")] == get_args(config.GenerateSnapshot)
    assert choices[("generate", "noise_mode")] == get_args(config.NoiseMode)
    assert choices[("train-gan", "preset")] == get_args(config.GanPreset)


@pytest.mark.parametrize(
    "section, key, value",
    [
        (ClassifierParams, "backbone", "resnet101"),
        (ClassifierParams, "head", "attention"),
        (ClassifierParams, "optimizer", "lamb"),
        (ClassifierParams, "monitor", "valid_f1"),
        (ClassifierParams, "inference_precision", "fp16"),
        (SelectParams, "metric", "auc"),
        (SelectParams, "compare_metric", "kappa"),
        (SweepParams, "executor", "slurm"),
        (GanParams, "preset", "huge"),
    ],
)
def test_an_unknown_choice_is_refused_naming_the_key(section, key, value):
    with pytest.raises(pydantic.ValidationError, match=key):
        section(**{key: value})


def test_unknown_arms_and_ops_are_refused_and_arms_stay_distinct():
    with pytest.raises(pydantic.ValidationError, match="arms"):
        SweepParams(arms=["synthetic", "gan"])
    with pytest.raises(pydantic.ValidationError, match="classic_augmentation"):
        SweepParams(classic_augmentation=["rotate", "shear"])
    with pytest.raises(pydantic.ValidationError, match="distinct"):
        SweepParams(arms=["synthetic", "synthetic"])


def test_every_default_is_one_of_its_choices():
    params = Params()
    assert params.classifier.backbone in config.BACKBONES
    assert params.sweep.arms == list(config.ARMS)
    assert params.gan.preset in config.GAN_PRESETS


def test_fail_on_names_the_checks_that_exist():
    """The suite's checks (each a `_Check("<name>", ...)` in ctsynth.validation.suite) and the
    synthetic stage's own are exactly what `fail_on` may list; a misspelt name is refused."""
    import ast
    from pathlib import Path

    import ctsynth.validation.suite as suite
    from ctsynth.config import SyntheticParams, ValidateParams

    tree = ast.parse(Path(suite.__file__).read_text())
    names = {node.args[0].value for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_Check" and isinstance(node.args[0], ast.Constant)}
    assert names == set(config.SUITE_CHECKS)
    assert set(config.SYNTHETIC_CHECKS) - set(config.SUITE_CHECKS) == {"exact_copies", "memorisation", "kid"}
    with pytest.raises(pydantic.ValidationError, match="fail_on"):
        ValidateParams(fail_on=["blanks"])
    with pytest.raises(pydantic.ValidationError, match="fail_on"):
        SyntheticParams(fail_on=["memorization"])
    assert SyntheticParams(fail_on=["kid", "leakage_near"]).fail_on == ["kid", "leakage_near"]


def test_the_synthetic_stage_names_its_own_checks_as_the_literal_does():
    from ctsynth.config import SyntheticParams
    from ctsynth.metrics.synthetic import quality_checks

    memo = {"fraction_below": {"p1": 0.0}, "exact_copies": 0}
    metrics = {"memorisation": {"overall": {"synthetic": memo}},
               "quality": {"overall": {"synthetic": {"kid": 0.1}, "floor": {"kid": 0.0, "kid_std": 0.1}}}}
    assert set(quality_checks(metrics, SyntheticParams())) == set(config.SYNTHETIC_CHECKS) - set(config.SUITE_CHECKS)
