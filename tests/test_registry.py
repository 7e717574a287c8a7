"""MLflow Model Registry: register + alias move, load_champion, the no-champion error. Real sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctsynth.export import export_onnx
from ctsynth.registry import ChampionNotFoundError, load_champion, load_onnx_file, register_champion
from ctsynth.tracking import CHAMPION_ALIAS, REGISTERED_MODEL

RESOLUTION = 16


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # artifacts under tmp_path/mlartifacts
    return tmp_path


def tiny_model(n_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, n_classes)
    ).eval()


def export(tmp_path, classes, seed, name):
    model = tiny_model(len(classes), seed)
    onnx_path = export_onnx(model, RESOLUTION, classes, tmp_path / f"{name}.onnx")
    state_path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), state_path)
    return onnx_path, state_path


def test_missing_champion_is_a_clear_error(store):
    with pytest.raises(ChampionNotFoundError, match=r"no version with alias '@champion'.*dvc repro select"):
        load_champion()


def test_register_twice_moves_the_alias_and_load_returns_the_new_model(store):
    from mlflow import MlflowClient

    example = np.zeros((3, 1, RESOLUTION, RESOLUTION), np.float32)
    onnx_a, state_a = export(store, ["normal", "squamous"], seed=0, name="a")
    version_a = register_champion(onnx_a, state_a, {"accuracy": 0.8, "confusion": [[4, 1], [0, 5]]}, {"ratio": 0.0, "seed": 1}, example)
    champion = load_champion()
    assert (champion.version, champion.classes, champion.resolution) == (version_a, ["normal", "squamous"], RESOLUTION)
    assert champion.onnx_bytes == onnx_a.read_bytes()

    onnx_b, state_b = export(store, ["normal", "squamous", "adenocarcinoma"], seed=1, name="b")
    version_b = register_champion(onnx_b, state_b, {"accuracy": 0.9}, {"ratio": 0.5, "model": {"backbone": "tiny"}}, example, tags={"ratio": "0.5"})
    assert int(version_b) == int(version_a) + 1

    client = MlflowClient()
    assert str(client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS).version) == version_b
    champion = load_champion()
    assert champion.version == version_b
    assert champion.classes == ["normal", "squamous", "adenocarcinoma"]
    assert champion.onnx_bytes == onnx_b.read_bytes()
    logits = champion.session().run(["logits"], {"image": np.zeros((2, 1, RESOLUTION, RESOLUTION), np.float32)})[0]
    assert logits.shape == (2, 3)

    # weights, metrics and params are in the run that produced the version
    version = client.get_model_version(REGISTERED_MODEL, version_b)
    assert version.tags["ratio"] == "0.5" and json.loads(version.tags["classes"])[2] == "adenocarcinoma"
    run = client.get_run(version.run_id)
    assert run.data.metrics["champion.accuracy"] == pytest.approx(0.9)
    prefix = f"champion/v{version_b}"
    artifacts = {a.path for a in client.list_artifacts(version.run_id, prefix)}
    assert {f"{prefix}/metrics.json", f"{prefix}/params.json", f"{prefix}/pytorch"} <= artifacts
    assert [a.path for a in client.list_artifacts(version.run_id, f"{prefix}/pytorch")] == [f"{prefix}/pytorch/b.pt"]
    import mlflow

    params_file = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=f"{prefix}/params.json", dst_path=str(store / "dl"))
    assert json.loads(Path(params_file).read_text())["model"]["backbone"] == "tiny"
    # the version's source is the logged model (models:/m-...); its params are there too
    logged_model_id = version.model_id or version.source.removeprefix("models:/")
    assert mlflow.get_logged_model(logged_model_id).params["model.backbone"] == "tiny"
    # the model version carries the signature the service relies on
    import mlflow

    model_info = mlflow.models.get_model_info(f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}")
    assert model_info.signature.inputs.input_names() == ["image"]
    assert model_info.signature.outputs.input_names() == ["logits"]


def test_register_into_an_existing_run_twice_with_different_params(store):
    from ctsynth.tracking import EXPERIMENT_CLASSIFIER, start_run

    onnx_path, state_path = export(store, ["normal", "squamous"], seed=0, name="c")
    with start_run(EXPERIMENT_CLASSIFIER, "parent") as parent:
        pass
    example = np.zeros((1, 1, RESOLUTION, RESOLUTION), np.float32)
    first = register_champion(onnx_path, state_path, {"accuracy": 0.7}, {"ratio": 0.5}, example, run_id=parent.info.run_id)
    # `select` re-run after more seeds: same parent run, another champion (run params are immutable)
    second = register_champion(onnx_path, state_path, {"accuracy": 0.8}, {"ratio": 0.25}, example, run_id=parent.info.run_id)
    assert int(second) == int(first) + 1
    champion = load_champion()
    assert champion.run_id == parent.info.run_id and champion.version == second


def test_register_rejects_wrong_input_example_and_missing_files(store):
    onnx_path, state_path = export(store, ["normal", "squamous"], seed=0, name="d")
    with pytest.raises(ValueError, match=r"expected N x 1 x 16 x 16"):
        register_champion(onnx_path, state_path, {}, {}, np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(FileNotFoundError, match="missing.onnx does not exist"):
        register_champion(store / "missing.onnx", state_path, {}, {}, np.zeros((1, 1, 16, 16), np.float32))


def test_load_onnx_file(store):
    onnx_path, _ = export(store, ["normal", "squamous"], seed=0, name="e")
    model = load_onnx_file(onnx_path)
    assert (model.classes, model.resolution, model.version) == (["normal", "squamous"], RESOLUTION, "file")
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        load_onnx_file(store / "nope.onnx")
