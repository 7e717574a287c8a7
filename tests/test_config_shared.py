"""Config says each thing once: params.yaml's values are the typed defaults, a params file that is
not there is an error, and paths from params resolve in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctsynth.config import Params, load_params, read_params_dict
from ctsynth.paths import resolve

REPO = Path(__file__).resolve().parents[1]


def differences(written: object, default: object, where: str) -> list[str]:
    """Every key of params.yaml whose value differs from the config default (keys that
    params.yaml leaves out are not compared: the default is then what runs)."""
    if isinstance(written, dict) and isinstance(default, dict):
        found = []
        for key, value in written.items():
            if key not in default:
                found.append(f"{where}{key}: in params.yaml, not in config.py")
            else:
                found.extend(differences(value, default[key], f"{where}{key}."))
        return found
    return [] if written == default else [f"{where.rstrip('.')}: params.yaml {written!r}, config.py {default!r}"]


def test_params_yaml_values_are_the_config_defaults():
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params().model_dump(by_alias=True)
    found = differences(written, defaults, "")
    assert not found, "params.yaml and the defaults in src/ctsynth/config.py disagree:\n" + "\n".join(found)


def test_differences_are_found():
    defaults = {"a": {"b": 1, "c": [1, 2]}, "d": None}
    assert differences({"a": {"b": 1, "c": [1, 2]}, "d": None}, defaults, "") == []
    assert differences({"a": {"b": 2}, "e": 0}, defaults, "") == [
        "a.b: params.yaml 2, config.py 1",
        "e: in params.yaml, not in config.py",
    ]


def test_a_params_file_that_is_not_there_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file .*typo.yaml does not exist"):
        load_params(tmp_path / "typo.yaml")


def test_a_dvc_repository_without_params_yaml_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="params.yaml does not exist"):
        load_params()


def test_outside_a_dvc_repository_the_defaults_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_params_dict() == {}
    assert load_params() == Params()


def test_the_repository_params_file_is_read(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("data: {resolution: 32}\n")
    monkeypatch.chdir(tmp_path)
    assert load_params().data.resolution == 32


def test_resolve_keeps_absolute_paths_and_roots_relative_ones(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve("data/prepared") == tmp_path.resolve() / "data/prepared"
    assert resolve("data/prepared", root=Path("/srv/study")) == Path("/srv/study/data/prepared")
    absolute = tmp_path / "elsewhere" / "cache"
    assert resolve(str(absolute)) == absolute
