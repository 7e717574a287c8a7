"""Scale-out: one `mlflow server` on a real PostgreSQL database, several worker processes writing to it.

A throw-away PostgreSQL cluster (Debian's `postgresql` package: `.ci/run` installs it) listens on
127.0.0.1; `mlflow server` uses it as backend store with a folder as artifact destination
(`--serve-artifacts`, so workers upload through the server). Two worker processes log their runs
under one sweep parent at the same time, the champion is registered with its alias, and the rows
are then read back from PostgreSQL itself and the files from the artifact folder.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _mlflow_server import free_port, mlflow_server  # tests/e2e/_mlflow_server.py

pytestmark = pytest.mark.e2e

DATABASE = "mlflow"


def _postgres_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL cluster on 127.0.0.1 (trust auth, fsync off: a test database). Its URI."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql; .ci/run does this)")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is in the dev extra: pip install -e '.[dev]'")
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user.
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="ctsynth-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "ctsynth", "-A", "trust", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start"],
                       check=True, capture_output=True, timeout=120)
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="ctsynth", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute(f"CREATE DATABASE {DATABASE}")
        connection.close()
        yield f"postgresql://ctsynth@127.0.0.1:{port}/{DATABASE}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server_on_postgres(postgres, tmp_path_factory):
    """`mlflow server` on PostgreSQL, artifacts in a folder it serves: (URL, artifact folder, database URI)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(postgres.replace("postgresql://", "postgresql+psycopg2://"), folder, workers=2) as url:
        yield url, folder / "mlartifacts", postgres


RESOLUTION = 16


def tiny_exported_classifier(folder: Path) -> tuple[Path, Path]:
    """A small real classifier exported with ctsynth.export: (ONNX file, PyTorch state file)."""
    import torch

    from ctsynth.export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    ).eval()
    state_path = folder / "champion.pt"
    torch.save(model.state_dict(), state_path)
    return export_onnx(model, RESOLUTION, ["normal", "squamous"], folder / "champion.onnx"), state_path


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ctsynth import tracking

    parent_id, worker, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    for seed in range(3):
        with tracking.start_run(tracking.EXPERIMENT_CLASSIFIER, f"{worker}-s{seed}", tags={"worker": worker, "seed": seed},
                                parent_run_id=parent_id) as run:
            import mlflow
            mlflow.log_params({"ratio": 0.5, "seed": seed})
            for epoch in range(5):
                mlflow.log_metric("valid_loss", 1.0 / (epoch + 1 + seed), step=epoch)
            note = out / f"{worker}-s{seed}.txt"
            note.write_text(f"{worker} {seed}")
            mlflow.log_artifact(str(note), artifact_path="notes")
    """
)


def test_workers_share_one_server_on_postgresql_and_the_champion_is_registered(server_on_postgres, tmp_path, monkeypatch):
    import psycopg2
    from mlflow import MlflowClient

    from ctsynth import tracking
    from ctsynth.registry import load_champion, register_champion

    url, artifact_folder, database_uri = server_on_postgres
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with tracking.start_run(tracking.EXPERIMENT_CLASSIFIER, "sweep-parent", tags={"sweep_id": "scaleout-test"}) as parent:
        parent_id = parent.info.run_id

    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, parent_id, name, str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name in ("worker-a", "worker-b")
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output.decode()[-3000:]

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT_CLASSIFIER)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(run.data.tags["worker"] for run in children) == ["worker-a"] * 3 + ["worker-b"] * 3
    assert all(len(client.get_metric_history(run.info.run_id, "valid_loss")) == 5 for run in children)

    example = np.zeros((2, 1, RESOLUTION, RESOLUTION), np.float32)
    onnx_path, state_path = tiny_exported_classifier(tmp_path)
    version = register_champion(onnx_path, state_path, {"accuracy": 0.8}, {"ratio": 0.5, "seed": 0}, example)
    champion = load_champion()
    assert champion.version == version and champion.onnx_bytes == onnx_path.read_bytes()

    # The records are in PostgreSQL, the files in the server's artifact folder.
    with psycopg2.connect(database_uri) as connection:
        cursor = connection.cursor()
        cursor.execute("SELECT count(*) FROM runs WHERE run_uuid IN %s", (tuple(r.info.run_id for r in children),))
        assert cursor.fetchone()[0] == 6
        cursor.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
                       (tracking.REGISTERED_MODEL, tracking.CHAMPION_ALIAS))
        assert str(cursor.fetchone()[0]) == version
    notes = sorted(path.name for path in artifact_folder.rglob("notes/*.txt"))
    assert notes == sorted(f"{w}-s{s}.txt" for w in ("worker-a", "worker-b") for s in range(3))
