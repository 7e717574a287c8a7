"""Repository vs. MLflow store location, inside and outside a queued DVC experiment."""

from pathlib import Path

from ctsynth import tracking
from ctsynth.paths import repo_root, store_root


def test_queued_experiment_reads_its_copy_but_logs_to_the_workspace_store(tmp_path, monkeypatch):
    workspace, copy = tmp_path / "workspace", tmp_path / "exp-copy"
    for folder in (workspace, copy / "pipelines"):
        folder.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(copy / "pipelines")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert repo_root() == copy.resolve()
    assert store_root() == workspace.resolve()
    assert tracking.tracking_uri(repo_root()) == f"sqlite:///{workspace.resolve() / 'mlflow.db'}"


def test_without_dvc_the_store_is_in_the_repository(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store_root() == repo_root() == Path(tmp_path).resolve()
    assert tracking.tracking_uri().endswith(f"{Path(tmp_path).resolve()}/mlflow.db")
