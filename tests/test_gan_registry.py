"""`ctsynth-generator` in a real local MLflow registry (sqlite store): the trained network, its
grid and quality as the version's files, `@latest` resolving to the newest version, and `ctsynth generate --network
models:/ctsynth-generator@latest` producing the same images as the local file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from test_gan_train import CLASSES, tiny_config, write_two_class_set

from ctsynth.gan import checkpoint as ckpt
from ctsynth.gan.generate import generate_images
from ctsynth.gan.train import QUALITY_LOG, TrainOptions, load_training_data, train_gan
from ctsynth.registry import GENERATOR_ALIAS, GENERATOR_MODEL, register_generator

REPO = Path(__file__).resolve().parents[1]


def test_generator_registered_and_generate_from_models_uri(tmp_path, monkeypatch):
    import pandas as pd

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    data = load_training_data(write_two_class_set(tmp_path / "prepared"), CLASSES, 32)
    gan = tmp_path / "gan"
    final = train_gan(tiny_config(kimg=0.008, snap=0.008), data,
                      TrainOptions(out_dir=gan, classes=CLASSES, mlflow=True, progress=False))
    run_id = torch.load(final, weights_only=True)["mlflow_run_id"]
    quality = pd.read_csv(gan / QUALITY_LOG).iloc[-1].to_dict()
    grid = next((gan / "grids").glob("*.png"))

    version = register_generator(final, grid, quality, run_id=run_id)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    entry = client.get_model_version_by_alias(GENERATOR_MODEL, GENERATOR_ALIAS)
    assert str(entry.version) == version and entry.run_id == run_id
    assert float(entry.tags["kid"]) == pytest.approx(quality["kid"], rel=1e-5)
    assert "floor" in entry.description
    files = {a.path for a in client.list_artifacts(run_id, "generator")}
    assert files == {f"generator/{ckpt.FINAL_NETWORK}", f"generator/{grid.name}", "generator/quality.json"}
    assert client.get_run(run_id).data.metrics["generator_kid_floor"] == pytest.approx(quality["kid_floor"])

    # A second registration moves `latest`.
    assert register_generator(final, None, quality, run_id=run_id) == str(int(version) + 1)
    assert str(client.get_model_version_by_alias(GENERATOR_MODEL, GENERATOR_ALIAS).version) == str(int(version) + 1)

    env = os.environ | {"MLFLOW_TRACKING_URI": store, "DVC_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "ctsynth.cli", "--params", str(REPO / "params.yaml"), "generate",
         "--network", f"models:/{GENERATOR_MODEL}@{GENERATOR_ALIAS}", "--out", str(tmp_path / "from_registry"),
         "--per-class", "3", "--seed", "5", "--resolution", "32"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    local = generate_images(gan, tmp_path / "from_file", CLASSES, per_class=3, seed=5, progress=False)
    for relative in local["path"]:
        assert (tmp_path / "from_registry" / relative).read_bytes() == (tmp_path / "from_file" / relative).read_bytes()

    missing = subprocess.run(
        [sys.executable, "-m", "ctsynth.cli", "--params", str(REPO / "params.yaml"), "generate",
         "--network", f"models:/{GENERATOR_MODEL}@nonexistent", "--out", str(tmp_path / "x"), "--per-class", "1"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert missing.returncode != 0 and "cannot fetch" in missing.stderr
    assert json.loads((tmp_path / "from_registry" / ".ctsynth-generate.json").read_text())["files"]
