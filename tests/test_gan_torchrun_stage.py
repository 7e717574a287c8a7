"""The train_gan stage under torchrun: a real 2-process gloo group on CPU, tiny config. Rank 0
alone writes the reports, the MLflow records and the registry entry; rank 1 waits at a barrier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml
from test_gan_train import write_two_class_set

from ctsynth.gan import checkpoint as ckpt
from ctsynth.registry import GENERATOR_MODEL

REPO = Path(__file__).resolve().parents[1]


def test_train_gan_stage_under_torchrun_two_ranks(tmp_path):
    params = yaml.safe_load((REPO / "tests" / "e2e" / "params_tiny.yaml").read_text())
    params["gan"] |= {"kimg": 0.016, "snap": 0.008, "tick_kimg": 0.008}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the repository root
    write_two_class_set(tmp_path / "data" / "prepared")
    (tmp_path / "data" / "raw").mkdir()
    store = tmp_path / "mlflow.db"
    env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
                        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "pipelines" / "train_gan.py")]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 1 of 2" in result.stderr
    assert result.stderr.count("GAN report in") == 1

    out = tmp_path / "models" / "gan"
    assert (out / ckpt.FINAL_NETWORK).exists() and len(ckpt.list_snapshots(out)) == 2
    for name in ("losses.png", "ada_p.png", "real_vs_synthetic.png", "training_log.csv"):
        assert (tmp_path / "reports" / "gan" / name).exists(), name

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=["ctsynth-gan"])
    assert len(runs) == 1  # rank 1 opened no run of its own (the report reuses the training run)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
    assert [str(v.version) for v in client.search_model_versions(f"name='{GENERATOR_MODEL}'")] == ["1"]
