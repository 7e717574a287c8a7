"""The sweep on a real Ray cluster: a head node and one more worker node started here on 127.0.0.1
(`ray start`, 1 CPU each, small object store, no dashboard), a real `mlflow server`, a tiny sweep
with `sweep.executor: ray`. Every item must come back into the workspace and be a child run of one
parent; one Ray worker is killed while it runs an item, and Ray's retry must still finish it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install -e '.[ray]')")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny data writers
from _classifier_data import write_prepared, write_synthetic  # noqa: E402
from _mlflow_server import free_port, mlflow_server  # noqa: E402

from ctsynth.classifier.executor import run_sweep  # noqa: E402
from ctsynth.classifier.sweep import item_paths, sweep_items  # noqa: E402
from ctsynth.config import Params  # noqa: E402

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TASK_TITLE = "ray::ctsynth_sweep_item"  # the process title of a Ray worker while it runs an item
NODE_OPTIONS = ["--num-cpus=1", "--object-store-memory=100000000", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]


def processes_in_sessions(sessions: set[int]) -> dict[int, str]:
    """{pid: command line} of every live process in the given sessions (what `ray start` spawned)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) in sessions:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ProcessLookupError):
            continue
    return found


def stop_sessions(starters: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, each process of the sessions we started (by pid, nothing else)."""
    sessions = {p.pid for p in starters}
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in processes_in_sessions(sessions):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while processes_in_sessions(sessions) and time.monotonic() < deadline:
            time.sleep(0.5)
    for process in starters:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


@contextlib.contextmanager
def ray_cluster(log_folder: Path, timeout_s: float = 240) -> Iterator[tuple[str, set[int]]]:
    """A head node + one worker node on 127.0.0.1; yields (address, the nodes' session ids) once both
    nodes are alive."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))} | {"RAY_USAGE_STATS_ENABLED": "0"}
    starters = []
    try:
        for name, options in (("head", ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]),
                              ("worker", [f"--address=127.0.0.1:{port}"])):
            log = open(log_folder / f"ray-{name}.log", "wb")
            starters.append(subprocess.Popen([str(BIN / "ray"), "start", *options, *NODE_OPTIONS], stdout=log, stderr=subprocess.STDOUT,
                                             env=env, start_new_session=True))
            if name == "head":
                time.sleep(3)  # the worker node needs the head's GCS to be listening
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            for process, name in zip(starters, ("head", "worker")):
                if process.poll() is not None:
                    raise AssertionError(f"ray {name} exited {process.returncode}: {(log_folder / f'ray-{name}.log').read_text()[-3000:]}")
            with contextlib.suppress(Exception):
                ray.init(address=address, logging_level="WARNING")
                alive = sum(1 for node in ray.nodes() if node["Alive"])
                ray.shutdown()
                if alive == 2:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"the Ray cluster did not have 2 live nodes after {timeout_s:.0f} s")
            time.sleep(2)
        yield address, {process.pid for process in starters}  # start_new_session: session id = pid
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        stop_sessions(starters)
        shutil.rmtree(temp_dir, ignore_errors=True)


class KillOneTask(threading.Thread):
    """Watches the cluster's processes and SIGKILLs the first Ray worker seen running an item."""

    def __init__(self, sessions: set[int]):
        super().__init__(daemon=True)
        self.sessions, self.killed, self.stop = sessions, None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for pid, command in processes_in_sessions(self.sessions).items():
                if command.startswith(TASK_TITLE):
                    time.sleep(1.0)  # let it get into the item (data written, MLflow run opened)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        self.killed = (pid, command)
                    break
            time.sleep(0.2)


def test_sweep_on_a_ray_cluster_with_a_killed_worker(tmp_path, monkeypatch):
    root = tmp_path / "workspace"
    write_prepared(root, {"train": (12, 12), "valid": (4, 4), "test": (5, 5)}, size=16)
    write_synthetic(root, per_class=8, size=16)
    params = Params.model_validate({
        "data": {"resolution": 16},
        "classifier": {"resolution": 16, "epochs": 3, "patience": 2, "batch_size": 8, "inference_precision": "fp32"},
        "sweep": {"arms": ["synthetic"], "ratios": [0.0, 0.5], "seeds": [0, 1], "executor": "ray", "ray": {"num_cpus": 1, "num_gpus": 0}},
    })
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as url, ray_cluster(tmp_path) as (address, sessions):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("RAY_ADDRESS", address)
        killer = KillOneTask(sessions)
        killer.start()
        try:
            outcome = run_sweep(params, root, progress=False)
        finally:
            killer.stop.set()
            killer.join(timeout=5)

        names = [item.name for item in sweep_items(params)]
        assert sorted(outcome.ran) == sorted(names)
        assert killer.killed is not None, "no Ray worker was seen running an item"
        for item in sweep_items(params):
            metrics, weights, _ = item_paths(params, root, item)
            assert metrics.is_file() and weights.stat().st_size > 0, item.name  # came back into the workspace
            assert json.loads(metrics.read_text())["state_dict"] == f"models/classifier/runs/{item.name}.pt"

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url)
        parent = client.get_run(outcome.parent_run_id)
        children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        finished = sorted(run.info.run_name for run in children if run.info.status == "FINISHED")
        assert finished == sorted(names)  # every item once, under the one parent
        others = [run for run in children if run.info.status != "FINISHED"]
        assert all(run.info.status == "FAILED" for run in others)  # the killed attempt, if it had opened its run
        for run in children:
            record = json.loads(item_paths(params, root, next(i for i in sweep_items(params) if i.name == run.info.run_name))[0].read_text())
            assert record["mlflow"]["parent_run_id"] == parent.info.run_id
