"""A stage's `ctsynth` command writes its options into the params object and hands it, with the
run-only options, to the stage's own module (ctsynth.stages.<stage>); an option not given keeps
the params value. (tests/e2e/test_cli_stage_parity.py runs commands and scripts for real.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctsynth import stages
from ctsynth.cli import main
from ctsynth.config import Params, with_overrides


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """What each command hands to stages.execute: (stage module name, params, root, options)."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gan": {"overrides": {"gamma": 5}}, "generate": {"seed": 7, "psi": 0.8}}))
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(stages, "execute", lambda stage, params, root, **options: seen.append((stage.__name__, params, root, options)) or 0)
    return seen


def test_prepare_options_are_the_data_section(calls, tmp_path):
    outside = tmp_path.parent / "elsewhere"
    assert main(["prepare", "--raw", "data/raw", "--out", str(outside), "--resolution", "32", "--allow-outside-repo"]) == 0
    (name, params, root, options), = calls
    assert name == "ctsynth.stages.prepare" and root == tmp_path and options == {}
    assert (params.data.raw, params.data.prepared, params.data.resolution, params.data.allow_outside_repo) == (
        "data/raw", str(outside.resolve()), 32, True)  # inside the repository: relative, as params.yaml writes it


def test_validate_and_validate_synthetic_name_their_sections(calls):
    main(["validate", "--raw", "r", "--prepared", "p", "--report", "out/v"])
    main(["validate-synthetic", "--synthetic", "s", "--prepared", "p", "--report", "out/s", "--no-mlflow"])
    (_, validate, _, _), (name, synthetic, _, options) = calls
    assert (validate.data.raw, validate.data.prepared, validate.validation.report) == ("r", "p", "out/v")
    assert name == "ctsynth.stages.validate_synthetic" and options == {"log_to_mlflow": False}
    assert (synthetic.synthetic.synthetic, synthetic.data.prepared, synthetic.synthetic.report) == ("s", "p", "out/s")


def test_train_gan_adds_set_to_the_overrides_and_passes_how_to_run(calls):
    main(["train-gan", "--data", "data/prepared", "--out", "models/x", "--kimg", "3", "--set", "batch=8", "--resume", "none",
          "--device", "cpu", "--no-mlflow"])
    (name, params, _, options), = calls
    assert name == "ctsynth.stages.train_gan"
    assert params.gan.overrides == {"gamma": 5, "batch": 8} and params.gan.kimg == 3 and params.gan.out == "models/x"
    assert params.gan.snap == Params().gan.snap and params.gan.report == Params().gan.report  # not given: params' values
    assert options == {"device": "cpu", "resume": None, "log_to_mlflow": False}


def test_generate_keeps_the_params_values_of_options_not_given(calls):
    main(["generate", "--network", "models:/ctsynth-generator@latest", "--out", "data/s", "--per-class", "3"])
    (_, params, _, _), = calls
    assert params.gan.out == "models:/ctsynth-generator@latest" and params.generate.per_class == 3
    assert (params.generate.seed, params.generate.psi, params.generate.snapshot) == (7, 0.8, "final")


def test_train_classifier_refuses_unknown_items_with_status_2(tmp_path, monkeypatch, caplog):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train-classifier", "--item", "synthetic_r7.0_s0"]) == 2
    assert "not items of this sweep: synthetic_r7.0_s0" in caplog.text


def test_with_overrides_validates_and_keeps_unset_keys():
    params = with_overrides(Params(), data={"resolution": None, "raw": "x"}, validation={"report": "r"})
    assert (params.data.raw, params.data.resolution, params.validation.report) == ("x", 64, "r")
    with pytest.raises(ValueError, match="resolution"):
        with_overrides(Params(), data={"resolution": 2})


def test_gan_config_puts_kimg_and_snap_over_the_overrides():
    from ctsynth.stages.train_gan import gan_config

    params = with_overrides(Params(), gan={"preset": "tiny", "kimg": 0.5, "snap": 0.25, "overrides": {"kimg": 99, "gamma": 3.0}},
                            data={"resolution": 32})
    cfg = gan_config(params)
    assert (cfg.kimg, cfg.snap, cfg.gamma, cfg.resolution) == (0.5, 0.25, 3.0, 32)


def test_every_stage_script_accepts_params(tmp_path, monkeypatch):
    """`python pipelines/<stage>.py --params FILE` reads FILE (stages.main)."""
    seen = []
    monkeypatch.setattr(stages, "execute", lambda stage, params, root: seen.append(params) or 0)
    custom = tmp_path / "custom.yaml"
    custom.write_text("data: {resolution: 24}\n")
    from ctsynth.stages import prepare

    assert stages.main(prepare, ["--params", str(custom)]) == 0
    assert seen[0].data.resolution == 24
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stages.main(prepare, ["--params", str(tmp_path / "missing.yaml")])


def test_execute_turns_results_and_expected_errors_into_exit_codes(caplog):
    import types

    class Failed(RuntimeError):
        pass

    def fail(params, root):
        raise Failed("item x failed")

    ok = types.SimpleNamespace(run=lambda params, root, **o: o.get("value", 3), exit_code=lambda r: 0 if r == 3 else 1)
    assert stages.execute(ok, Params(), Path(".")) == 0 and stages.execute(ok, Params(), Path("."), value=4) == 1
    failing = types.SimpleNamespace(run=fail, EXPECTED_ERRORS=(Failed,))
    assert stages.execute(failing, Params(), Path(".")) == 1 and "item x failed" in caplog.text
    with pytest.raises(Failed):
        stages.execute(types.SimpleNamespace(run=fail), Params(), Path("."))
